#!/usr/bin/env bash
# Run the real-node end-to-end tests (TestRealNode*): a real control plane plus a
# real kubelet, containerd, runc and CNI on this machine, with the driver's plugin
# registered with that kubelet. Builds what is missing: the control plane
# (hack/build-control-plane.sh, ~10 minutes the first time), the kubelet and
# containerd (hack/build-node.sh, ~3 more minutes), the kernel emulator and the
# workload that the pods run. Needs root, Debian's runc and containernetworking-plugins
# (CI=true installs them with apt-get), util-linux and iproute2.
#
# Environment:
#   VFIO_E2E_BIN_DIR         control-plane binaries (default ~/.cache/vfio-dra-driver/control-plane)
#   VFIO_E2E_NODE_BIN_DIR    kubelet and containerd (default ~/.cache/vfio-dra-driver/node)
#   VFIO_E2E_DRIVER_BIN_DIR  where "make build" put the driver's binaries (default bin)
#   VFIO_E2E_IMAGE_TAR       the image tarball of "make image", for the chart's DaemonSet
#   VFIO_E2E_IMAGE           the image's name in it ("make e2e-node" sets both)
#   GO_TEST_FLAGS            extra flags for go test, e.g. "-run TestRealNodeSmartNIC"
set -o errexit -o nounset -o pipefail

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${E2E_DIR}/../.." && pwd)"
CACHE="${XDG_CACHE_HOME:-${HOME}/.cache}/vfio-dra-driver"
export VFIO_E2E_BIN_DIR="${VFIO_E2E_BIN_DIR:-${CACHE}/control-plane}"
export VFIO_E2E_NODE_BIN_DIR="${VFIO_E2E_NODE_BIN_DIR:-${CACHE}/node}"
export VFIO_E2E_DRIVER_BIN_DIR="${VFIO_E2E_DRIVER_BIN_DIR:-${REPO_ROOT}/bin}"
GO="${GO:-go}"

"${E2E_DIR}/hack/node-packages.sh"
"${E2E_DIR}/hack/build-control-plane.sh"
"${E2E_DIR}/hack/build-node.sh"
(cd "${REPO_ROOT}" && "${GO}" build -o "${VFIO_E2E_DRIVER_BIN_DIR}/kernelemu" ./test/kernelemu)
# Static: it is the whole image the pods run.
(cd "${E2E_DIR}" && CGO_ENABLED=0 "${GO}" build -o "${VFIO_E2E_DRIVER_BIN_DIR}/vfio-e2e-workload" ./cmd/workload)

cd "${E2E_DIR}"
# shellcheck disable=SC2086 # GO_TEST_FLAGS is a list of flags.
exec "${GO}" test -count=1 -v -timeout 30m -run '^TestRealNode' ${GO_TEST_FLAGS:-} .
