#!/usr/bin/env bash
# Run the end-to-end tests against a real control plane: build etcd, kube-apiserver,
# kube-scheduler, kube-controller-manager and kubectl if needed (the first build takes
# about 10 minutes) and the kernel emulator that runs beside the kubelet plugin, then run
# the tests of the test/e2e module.
#
# Environment:
#   VFIO_E2E_BIN_DIR         where the control-plane binaries live (default ~/.cache/vfio-dra-driver/control-plane)
#   VFIO_E2E_DRIVER_BIN_DIR  where "make build" put the driver's binaries (default bin)
#   GO_TEST_FLAGS            extra flags for go test, e.g. "-run TestControlPlane"
set -o errexit -o nounset -o pipefail

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${E2E_DIR}/../.." && pwd)"
export VFIO_E2E_BIN_DIR="${VFIO_E2E_BIN_DIR:-${XDG_CACHE_HOME:-${HOME}/.cache}/vfio-dra-driver/control-plane}"
export VFIO_E2E_DRIVER_BIN_DIR="${VFIO_E2E_DRIVER_BIN_DIR:-${REPO_ROOT}/bin}"
GO="${GO:-go}"

"${E2E_DIR}/hack/build-control-plane.sh"

# The node tests run test/kernelemu next to the plugin. "go build" leaves an up-to-date
# binary alone, so this costs nothing after the first time.
(cd "${REPO_ROOT}" && "${GO}" build -o "${VFIO_E2E_DRIVER_BIN_DIR}/kernelemu" ./test/kernelemu)

# The chart's output with default values and with every option, which TestChartManifests
# applies (Helm is built once and cached, like the control plane).
"${REPO_ROOT}/deployments/helm/chart.sh" template "${VFIO_E2E_DRIVER_BIN_DIR}/chart"

cd "${E2E_DIR}"
# shellcheck disable=SC2086 # GO_TEST_FLAGS is a list of flags.
# The real-node tests have a runner of their own (run-node.sh).
exec "${GO}" test -count=1 -v -timeout 30m -skip '^TestRealNode' ${GO_TEST_FLAGS:-} ./...
