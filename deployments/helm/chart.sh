#!/usr/bin/env bash
# The chart's checks and the manifests rendered from it.
#
#   chart.sh render   write deployments/kubernetes from the chart (make manifests)
#   chart.sh template DIR
#                     write DIR/default.yaml and DIR/all-options.yaml (the chart with default
#                     values and with ci/all-options-values.yaml), which the end-to-end tests
#                     apply with --dry-run=server
#   chart.sh check    helm lint and helm template with Helm 3 and Helm 4, default values
#                     and ci/all-options-values.yaml; values the chart must refuse; and
#                     deployments/kubernetes must be what render writes (make test)
#
# Helm is built from the versions pinned in tools/go.mod, once, into
# ~/.cache/vfio-dra-driver/tools (VFIO_TOOLS_CACHE). VFIO_HELM_MAJORS (default "v3 v4")
# names the Helm versions check lints and templates with.
set -o errexit -o nounset -o pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CHART="${REPO_ROOT}/deployments/helm/vfio-dra-driver"
MANIFESTS="${REPO_ROOT}/deployments/kubernetes"
TOOLS_CACHE="${VFIO_TOOLS_CACHE:-${XDG_CACHE_HOME:-${HOME}/.cache}/vfio-dra-driver/tools}"
GO="${GO:-go}"
# The release the manifests in deployments/kubernetes are rendered as.
RELEASE=vfio-dra-driver
NAMESPACE=vfio-dra-driver
# helm template assumes an old Kubernetes without a cluster; the chart needs 1.36+.
KUBE_VERSION=v1.37.2

# helm MAJOR prints the path of the pinned Helm MAJOR (v3, v4), building it if needed.
helm() {
	local major=$1 version bin
	version="$(cd "${REPO_ROOT}/tools" && "${GO}" list -m -f '{{.Version}}' "helm.sh/helm/${major}")"
	bin="${TOOLS_CACHE}/helm-${version}"
	if [[ ! -x "${bin}" ]]; then
		echo "building helm ${version} into ${bin} (a few minutes, once)" >&2
		mkdir -p "${TOOLS_CACHE}"
		(cd "${REPO_ROOT}/tools" && CGO_ENABLED=0 nice -n 10 "${GO}" build -trimpath -o "${bin}.tmp" "helm.sh/helm/${major}/cmd/helm")
		mv "${bin}.tmp" "${bin}"
	fi
	echo "${bin}"
}

# render DIR writes the manifests into DIR, one file per template.
render() {
	local dir=$1 out
	out="$(mktemp -d)"
	"$(helm v3)" template "${RELEASE}" "${CHART}" --kube-version "${KUBE_VERSION}" --namespace "${NAMESPACE}" --set namespace.create=true --output-dir "${out}" >/dev/null
	mkdir -p "${dir}"
	for f in "${out}/vfio-dra-driver/templates/"*.yaml; do
		{
			echo "# Rendered from deployments/helm/vfio-dra-driver by 'make manifests': do not edit."
			cat "${f}"
		} >"${dir}/$(basename "${f}")"
	done
	rm -rf "${out}"
	{
		echo "# Rendered from deployments/helm/vfio-dra-driver by 'make manifests': do not edit."
		echo "apiVersion: kustomize.config.k8s.io/v1beta1"
		echo "kind: Kustomization"
		echo "resources:"
		for f in "${dir}"/*.yaml; do
			[[ "$(basename "${f}")" == kustomization.yaml ]] || echo "- $(basename "${f}")"
		done
	} >"${dir}/kustomization.yaml.tmp"
	mv "${dir}/kustomization.yaml.tmp" "${dir}/kustomization.yaml"
}

# refuse HELM WHAT MESSAGE ARGS... checks that helm template refuses values the chart must
# refuse, with an error that says MESSAGE.
refuse() {
	local helm=$1 what=$2 message=$3 out
	shift 3
	if out="$("${helm}" template "${RELEASE}" "${CHART}" --kube-version "${KUBE_VERSION}" "$@" 2>&1)"; then
		echo "FAIL: helm template accepted ${what}: $*" >&2
		return 1
	fi
	if [[ "${out}" != *"${message}"* ]]; then
		echo "FAIL: helm template refused ${what} without saying '${message}': ${out}" >&2
		return 1
	fi
}

check() {
	local failed=0 h v
	for v in ${VFIO_HELM_MAJORS:-v3 v4}; do
		h="$(helm "${v}")"
		echo "== $("${h}" version --short)"
		"${h}" lint --strict --kube-version "${KUBE_VERSION}" "${CHART}"
		"${h}" lint --strict --kube-version "${KUBE_VERSION}" "${CHART}" -f "${CHART}/ci/all-options-values.yaml"
		"${h}" template "${RELEASE}" "${CHART}" --kube-version "${KUBE_VERSION}" --namespace "${NAMESPACE}" >/dev/null
		"${h}" template "${RELEASE}" "${CHART}" --kube-version "${KUBE_VERSION}" --namespace "${NAMESPACE}" -f "${CHART}/ci/all-options-values.yaml" >/dev/null
		refuse "${h}" "a model without selectors" "set vendorID, deviceID or class" --set 'deviceClasses.models[0].name=x'
		refuse "${h}" "a model without a name" "every entry needs a name" --set 'deviceClasses.models[0].vendorID=10de'
		refuse "${h}" "an upper-case vendor ID" 'vendorID "10DE" is not 4 lower-case hex digits' --set 'deviceClasses.models[0].name=x' --set 'deviceClasses.models[0].vendorID=10DE'
		refuse "${h}" "an unknown VfioConfig field" "unknown VfioConfig fields [restore]" --set 'deviceClasses.generic.config.restore=true'
		refuse "${h}" "a ServiceMonitor without metrics" "metrics.serviceMonitor.enabled needs metrics.enabled" --set 'metrics.serviceMonitor.enabled=true'
	done
	local tmp
	tmp="$(mktemp -d)"
	# Helm 3 and 4 render the same objects (Helm 4 adds blank lines).
	local first=""
	for v in ${VFIO_HELM_MAJORS:-v3 v4}; do
		"$(helm "${v}")" template "${RELEASE}" "${CHART}" --kube-version "${KUBE_VERSION}" --namespace "${NAMESPACE}" \
			-f "${CHART}/ci/all-options-values.yaml" >"${tmp}/helm-${v}.yaml"
		if [[ -z "${first}" ]]; then
			first="${v}"
		elif ! diff -B "${tmp}/helm-${first}.yaml" "${tmp}/helm-${v}.yaml"; then
			echo "FAIL: Helm ${first} and Helm ${v} render the chart differently" >&2
			failed=1
		fi
	done
	rm -f "${tmp}"/helm-*.yaml
	render "${tmp}"
	if ! diff -ru "${MANIFESTS}" "${tmp}"; then
		echo "FAIL: deployments/kubernetes is not what the chart renders: run 'make manifests'" >&2
		failed=1
	fi
	rm -rf "${tmp}"
	return "${failed}"
}

template() {
	local dir=$1 h
	h="$(helm v3)"
	mkdir -p "${dir}"
	"${h}" template "${RELEASE}" "${CHART}" --kube-version "${KUBE_VERSION}" --namespace "${NAMESPACE}" >"${dir}/default.yaml"
	"${h}" template "${RELEASE}" "${CHART}" --kube-version "${KUBE_VERSION}" --namespace "${NAMESPACE}" -f "${CHART}/ci/all-options-values.yaml" >"${dir}/all-options.yaml"
}

case "${1:-}" in
template) template "${2:?usage: $0 template DIR}" ;;
render)
	rm -rf "${MANIFESTS}"
	render "${MANIFESTS}"
	;;
check) check ;;
*)
	echo "usage: $0 render|check" >&2
	exit 2
	;;
esac
