#!/usr/bin/env bash
# Build the control-plane binaries that the e2e tests run as processes: etcd,
# kube-apiserver, kube-scheduler, kube-controller-manager and kubectl, from the module
# versions pinned in test/e2e/go.mod, into ~/.cache/vfio-dra-driver/control-plane/ (or $VFIO_E2E_BIN_DIR).
#
# The first build compiles about 2,500 packages (roughly 10 minutes on 2 cores and
# about 4 GB of Go build cache). A stamp file records what the binaries were built
# from; when it still matches, nothing is rebuilt.
set -o errexit -o nounset -o pipefail

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO_ROOT="$(cd "${E2E_DIR}/../.." && pwd)"
# Outside the work tree, so that every clone on this machine (CI clones
# afresh) reuses one build.
OUT="${VFIO_E2E_BIN_DIR:-${XDG_CACHE_HOME:-${HOME}/.cache}/vfio-dra-driver/control-plane}"
GO="${GO:-go}"

KUBE_VERSION=v1.37.2
# Without these the binaries report v0.0.0-master+$Format:%H$, which kubectl cannot parse.
KUBE_LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	KUBE_LDFLAGS+=" -X ${pkg}.gitVersion=${KUBE_VERSION} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=37"
	KUBE_LDFLAGS+=" -X ${pkg}.gitTreeState=clean"
done
ETCD_LDFLAGS="-s -w"

# name:package pairs, built in this order (etcd first: it is small and shows that the
# toolchain works before the long kube-apiserver build).
BINARIES=(
	"etcd:go.etcd.io/etcd/server/v3"
	"kube-apiserver:k8s.io/kubernetes/cmd/kube-apiserver"
	"kube-scheduler:k8s.io/kubernetes/cmd/kube-scheduler"
	"kube-controller-manager:k8s.io/kubernetes/cmd/kube-controller-manager"
	"kubectl:k8s.io/kubernetes/cmd/kubectl"
)

log() { echo "build-control-plane: $*" >&2; }

cd "${E2E_DIR}"

packages=()
for b in "${BINARIES[@]}"; do packages+=("${b#*:}"); done

# The stamp covers everything that changes the output: the Go toolchain, the flags and
# every module the binaries are linked from (not the test module's other dependencies,
# so adding a test helper does not trigger a rebuild).
compute_stamp() {
	"${GO}" version
	echo "kube ldflags: ${KUBE_LDFLAGS}"
	echo "etcd ldflags: ${ETCD_LDFLAGS}"
	printf 'binary %s\n' "${BINARIES[@]}"
	"${GO}" list -deps -f '{{with .Module}}{{.Path}} {{.Version}}{{with .Replace}} => {{.Path}} {{.Version}}{{end}}{{end}}' \
		"${packages[@]}" | sort -u
}
stamp="$(compute_stamp)" || { log "cannot resolve the module graph of ${E2E_DIR}"; exit 1; }
stamp_file="${OUT}/.stamp"

up_to_date=true
for b in "${BINARIES[@]}"; do
	[[ -x "${OUT}/${b%%:*}" ]] || up_to_date=false
done
if [[ "${up_to_date}" == true && -f "${stamp_file}" && "$(cat "${stamp_file}")" == "${stamp}" ]]; then
	log "binaries in ${OUT} are up to date"
	exit 0
fi

mkdir -p "${OUT}"
rm -f "${stamp_file}"
start_all=${SECONDS}
for b in "${BINARIES[@]}"; do
	name="${b%%:*}"
	pkg="${b#*:}"
	ldflags="${KUBE_LDFLAGS}"
	[[ "${name}" == etcd ]] && ldflags="${ETCD_LDFLAGS}"
	hint=""
	[[ "${name}" == kube-apiserver ]] && hint=" (first build takes ~10 minutes, later ones seconds)"
	log "building ${name}${hint}"
	start=${SECONDS}
	# Build next to the target and rename, so that an interrupted build never leaves a
	# truncated binary behind.
	"${GO}" build -trimpath -ldflags "${ldflags}" -o "${OUT}/.${name}.tmp" "${pkg}"
	mv -f "${OUT}/.${name}.tmp" "${OUT}/${name}"
	log "built ${OUT}/${name} in $((SECONDS - start))s"
done
printf '%s\n' "${stamp}" >"${stamp_file}"
log "all binaries built in $((SECONDS - start_all))s"
