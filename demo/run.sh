#!/usr/bin/env bash
# The vfio.dra.dev driver end to end on this machine ("make demo"): a real etcd,
# kube-apiserver, kube-scheduler and kube-controller-manager on 127.0.0.1, a real
# node (kubelet, containerd, runc, CNI) whose PCI devices are a copy of the demo
# node (demo/sysfs, a two-socket server laid out as Linux lays out /sys) with a
# kernel emulator beside it, the kubelet plugin registered with that kubelet, and
# the pod in demo/gpu.yaml. The kubelet prepares the pod's claim and starts it; the
# demo shows the driver links on vfio-pci, the CDI spec and what the container
# sees, then deletes the pod (the kubelet unprepares) and tears everything down.
#
# "make demo" builds the driver first. This script builds what else is missing: the
# control-plane binaries (the first time about 10 minutes, see test/e2e/README.md),
# the kubelet and containerd (about 3 more minutes), the kernel emulator, the
# workload the pod runs and the demo program. Later runs start in seconds.
#
# Environment: BIN (driver binaries, default bin), VFIO_E2E_BIN_DIR (control plane,
# default ~/.cache/vfio-dra-driver/control-plane), VFIO_E2E_NODE_BIN_DIR (kubelet and
# containerd, default ~/.cache/vfio-dra-driver/node), GO, DEMO_FLAGS (e.g. --keep to
# keep the logs).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO_ROOT=$PWD
GO=${GO:-go}
BIN=${BIN:-bin}
[[ ${BIN} == /* ]] || BIN=${REPO_ROOT}/${BIN}
export VFIO_E2E_BIN_DIR=${VFIO_E2E_BIN_DIR:-${XDG_CACHE_HOME:-${HOME}/.cache}/vfio-dra-driver/control-plane}
export VFIO_E2E_NODE_BIN_DIR=${VFIO_E2E_NODE_BIN_DIR:-${XDG_CACHE_HOME:-${HOME}/.cache}/vfio-dra-driver/node}
export VFIO_E2E_DRIVER_BIN_DIR=${BIN}

if [[ $(id -u) != 0 ]]; then
	echo "make demo must run as root: the kernel emulator creates VFIO device nodes with mknod, and the node runs containers" >&2
	exit 1
fi
for b in vfio-dra vfio-kubelet-plugin; do
	[[ -x ${BIN}/${b} ]] || { echo "${BIN}/${b} is missing: run \"make build\" (or \"make demo\")" >&2; exit 1; }
done

echo "==> Building what is missing"
"${REPO_ROOT}/test/e2e/hack/node-packages.sh"
start=${SECONDS}
"${REPO_ROOT}/test/e2e/hack/build-control-plane.sh"
"${REPO_ROOT}/test/e2e/hack/build-node.sh"
# "go build" leaves an up-to-date binary alone.
"${GO}" build -o "${BIN}/kernelemu" ./test/kernelemu
(cd test/e2e && CGO_ENABLED=0 "${GO}" build -o "${BIN}/vfio-e2e-workload" ./cmd/workload)
(cd test/e2e && "${GO}" build -o "${BIN}/vfio-dra-demo" ./cmd/demo)
echo "build-demo: kernel emulator, workload and demo program in ${BIN}; everything built or checked in $((SECONDS - start))s" >&2

# shellcheck disable=SC2086 # DEMO_FLAGS is a list of flags.
exec "${BIN}/vfio-dra-demo" --repo-root "${REPO_ROOT}" ${DEMO_FLAGS:-}
