#!/usr/bin/env bash
# Build the node binaries that the real-node e2e tests run: the kubelet (from the
# k8s.io/kubernetes version pinned in test/e2e/go.mod), containerd, ctr and
# containerd-shim-runc-v2 (from hack/containerd/go.mod), into
# ~/.cache/vfio-dra-driver/node/ (or $VFIO_E2E_NODE_BIN_DIR).
#
# Built like the control plane (-trimpath, the same Go build cache), so after
# hack/build-control-plane.sh most of the kubelet's packages are cached already:
# about 1 minute for the kubelet and 2 for containerd on 2 cores; about 8 more
# minutes without the control plane's cache. A stamp file records what the
# binaries were built from; when it still matches, nothing is rebuilt.
#
# runc and the CNI plugins are Debian's (packages runc and containernetworking-plugins).
set -o errexit -o nounset -o pipefail

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CTRD_DIR="${E2E_DIR}/hack/containerd"
OUT="${VFIO_E2E_NODE_BIN_DIR:-${XDG_CACHE_HOME:-${HOME}/.cache}/vfio-dra-driver/node}"
GO="${GO:-go}"

KUBE_VERSION=v1.37.2
KUBE_LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	KUBE_LDFLAGS+=" -X ${pkg}.gitVersion=${KUBE_VERSION} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=37"
	KUBE_LDFLAGS+=" -X ${pkg}.gitTreeState=clean"
done
CTRD=github.com/containerd/containerd/v2
CTRD_VERSION=v2.4.2
CTRD_LDFLAGS="-s -w -X ${CTRD}/version.Version=${CTRD_VERSION} -X ${CTRD}/version.Revision=${CTRD_VERSION} -X ${CTRD}/version.Package=${CTRD}"
# containerd's Makefile tags minus the snapshotters that need cgo headers.
CTRD_TAGS="urfave_cli_no_docs no_btrfs no_devmapper no_zfs"
# As containerd's release: a static shim without the gRPC shim API.
SHIM_TAGS="urfave_cli_no_docs no_grpc"

log() { echo "build-node: $*" >&2; }

compute_stamp() {
	"${GO}" version
	echo "kube ldflags: ${KUBE_LDFLAGS}"
	echo "containerd ldflags: ${CTRD_LDFLAGS} tags: ${CTRD_TAGS} shim tags: ${SHIM_TAGS}"
	(cd "${E2E_DIR}" && "${GO}" list -deps -f '{{with .Module}}{{.Path}} {{.Version}}{{with .Replace}} => {{.Path}} {{.Version}}{{end}}{{end}}' \
		k8s.io/kubernetes/cmd/kubelet | sort -u)
	(cd "${CTRD_DIR}" && "${GO}" list -deps -tags "${CTRD_TAGS}" -f '{{with .Module}}{{.Path}} {{.Version}}{{end}}' \
		"${CTRD}/cmd/containerd" "${CTRD}/cmd/ctr" "${CTRD}/cmd/containerd-shim-runc-v2" | sort -u)
}
stamp="$(compute_stamp)" || { log "cannot resolve the module graphs of ${E2E_DIR} and ${CTRD_DIR}"; exit 1; }
stamp_file="${OUT}/.stamp"
binaries=(kubelet containerd ctr containerd-shim-runc-v2)

up_to_date=true
for b in "${binaries[@]}"; do
	[[ -x "${OUT}/${b}" ]] || up_to_date=false
done
if [[ "${up_to_date}" == true && -f "${stamp_file}" && "$(cat "${stamp_file}")" == "${stamp}" ]]; then
	log "binaries in ${OUT} are up to date"
	exit 0
fi

mkdir -p "${OUT}"
rm -f "${stamp_file}"
start_all=${SECONDS}
# build NAME DIR PACKAGE [go build flags...]: build next to the target and rename, so
# that an interrupted build never leaves a truncated binary behind.
build() {
	local name=$1 dir=$2 pkg=$3 start=${SECONDS}
	shift 3
	log "building ${name}"
	(cd "${dir}" && "${GO}" build -trimpath "$@" -o "${OUT}/.${name}.tmp" "${pkg}")
	mv -f "${OUT}/.${name}.tmp" "${OUT}/${name}"
	log "built ${OUT}/${name} in $((SECONDS - start))s"
}
build kubelet "${E2E_DIR}" k8s.io/kubernetes/cmd/kubelet -ldflags "${KUBE_LDFLAGS}"
build containerd "${CTRD_DIR}" "${CTRD}/cmd/containerd" -tags "${CTRD_TAGS}" -ldflags "${CTRD_LDFLAGS}"
build ctr "${CTRD_DIR}" "${CTRD}/cmd/ctr" -tags "${CTRD_TAGS}" -ldflags "${CTRD_LDFLAGS}"
CGO_ENABLED=0 build containerd-shim-runc-v2 "${CTRD_DIR}" "${CTRD}/cmd/containerd-shim-runc-v2" -tags "${SHIM_TAGS}" -ldflags "${CTRD_LDFLAGS}"
printf '%s\n' "${stamp}" >"${stamp_file}"
log "all node binaries built in $((SECONDS - start_all))s"
