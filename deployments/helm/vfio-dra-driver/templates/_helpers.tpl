{{/* The driver name is a contract (ResourceSlices, DeviceClasses, CDI). */}}
{{- define "vfio-dra-driver.driverName" -}}vfio.dra.dev{{- end }}

{{- define "vfio-dra-driver.labels" -}}
app.kubernetes.io/name: vfio-dra-driver
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "vfio-dra-driver.selectorLabels" -}}
app.kubernetes.io/name: vfio-kubelet-plugin
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vfio-dra-driver.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/* Cluster-scoped objects carry the release name, so two releases never clash. */}}
{{- define "vfio-dra-driver.clusterName" -}}{{ .Release.Name }}-kubelet-plugin{{- end }}

{{/* The opaque VfioConfig of a DeviceClass, from a map of its fields. */}}
{{- define "vfio-dra-driver.vfioConfig" -}}
{{- $unknown := omit . "driver" "restoreDriver" "iommufd" -}}
{{- if $unknown -}}
{{- fail (printf "deviceClasses config: unknown VfioConfig fields %v (known: driver, restoreDriver, iommufd)" (keys $unknown | sortAlpha)) -}}
{{- end -}}
config:
- opaque:
    driver: {{ include "vfio-dra-driver.driverName" . }}
    parameters:
      apiVersion: vfio.dra.dev/v1alpha1
      kind: VfioConfig
      {{- with .driver }}
      driver: {{ . | quote }}
      {{- end }}
      {{- if hasKey . "restoreDriver" }}
      restoreDriver: {{ .restoreDriver }}
      {{- end }}
      {{- if hasKey . "iommufd" }}
      iommufd: {{ .iommufd }}
      {{- end }}
{{- end }}

{{/* The metrics Service's label of its own, which the ServiceMonitor selects (with the release's). */}}
{{- define "vfio-dra-driver.metricsLabels" -}}
app.kubernetes.io/component: metrics
{{- end }}
