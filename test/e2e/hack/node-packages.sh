#!/usr/bin/env bash
# Check for the Debian packages a real node needs: runc, the CNI plugins, util-linux
# (unshare, nsenter) and iproute2. In CI (CI=true, root, apt) install what is
# missing; elsewhere say what to install.
set -o errexit -o nounset -o pipefail

missing=()
[[ -x /usr/sbin/runc ]] || missing+=(runc)
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] || missing+=(containernetworking-plugins)
command -v ip >/dev/null || missing+=(iproute2)
command -v nsenter >/dev/null || missing+=(util-linux)
((${#missing[@]} == 0)) && exit 0

if [[ "${CI:-}" == true && $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
	echo "node-packages: installing ${missing[*]}" >&2
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
	exit 0
fi
echo "node-packages: a real node needs the Debian packages ${missing[*]}: apt-get install ${missing[*]}" >&2
exit 1
