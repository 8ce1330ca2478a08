#!/usr/bin/env bash
# The vfio.dra.dev driver end to end on this machine ("make demo"): a real etcd,
# kube-apiserver, kube-scheduler and kube-controller-manager on 127.0.0.1, the
# kubelet plugin on a copy of the demo node (demo/sysfs, a two-socket server laid
# out as Linux lays out /sys) with a kernel emulator beside it, and the pod in
# demo/gpu.yaml. The demo plays the kubelet: it prepares the pod's claim through the
# plugin's gRPC socket, shows the CDI spec and the driver links on vfio-pci, then
# unprepares and tears everything down.
#
# "make demo" builds the driver first. This script builds what else is missing: the
# control-plane binaries (the first time about 10 minutes, see test/e2e/README.md),
# the kernel emulator and the demo program.
#
# Environment: BIN (driver binaries, default bin), VFIO_E2E_BIN_DIR (control plane,
# default ~/.cache/vfio-dra-driver/control-plane), GO, DEMO_FLAGS (e.g. --keep to keep the logs).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO_ROOT=$PWD
GO=${GO:-go}
BIN=${BIN:-bin}
[[ ${BIN} == /* ]] || BIN=${REPO_ROOT}/${BIN}
export VFIO_E2E_BIN_DIR=${VFIO_E2E_BIN_DIR:-${XDG_CACHE_HOME:-${HOME}/.cache}/vfio-dra-driver/control-plane}
export VFIO_E2E_DRIVER_BIN_DIR=${BIN}

if [[ $(id -u) != 0 ]]; then
	echo "make demo must run as root: the kernel emulator creates VFIO device nodes with mknod" >&2
	exit 1
fi
for b in vfio-dra vfio-kubelet-plugin; do
	[[ -x ${BIN}/${b} ]] || { echo "${BIN}/${b} is missing: run \"make build\" (or \"make demo\")" >&2; exit 1; }
done

echo "==> Building what is missing"
"${REPO_ROOT}/test/e2e/hack/build-control-plane.sh"
# "go build" leaves an up-to-date binary alone.
"${GO}" build -o "${BIN}/kernelemu" ./test/kernelemu
(cd test/e2e && "${GO}" build -o "${BIN}/vfio-dra-demo" ./cmd/demo)
echo "build-demo: kernel emulator and demo program in ${BIN}" >&2

# shellcheck disable=SC2086 # DEMO_FLAGS is a list of flags.
exec "${BIN}/vfio-dra-demo" --repo-root "${REPO_ROOT}" ${DEMO_FLAGS:-}
