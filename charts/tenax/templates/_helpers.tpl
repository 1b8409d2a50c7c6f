{{/* Names are cut at 63 characters: the DNS label limit of Kubernetes names. */}}
{{- define "tenax.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tenax.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<component>", e.g. tenax-controller. Call with (dict "root" $ "component" "controller"). */}}
{{- define "tenax.componentName" -}}
{{- printf "%s-%s" (include "tenax.fullname" .root | trunc 50 | trimSuffix "-") .component -}}
{{- end -}}

{{- define "tenax.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: tenax
{{ include "tenax.selectorLabels" . }}
{{- end -}}

{{/* Selector labels must never change after install: keep them to name, instance, component. */}}
{{- define "tenax.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tenax.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Image of a Tenax component: "<repo>:<tag>-<variant>" unless the component overrides the tag. */}}
{{- define "tenax.image" -}}
{{- $img := .root.Values.image -}}
{{- $tag := .values.image.tag | default (printf "%s-%s" ($img.tag | default .root.Chart.AppVersion) .values.image.variant) -}}
{{- printf "%s:%s" $img.repository $tag -}}
{{- end -}}

{{- define "tenax.serviceAccountName" -}}
{{- if .root.Values.serviceAccount.create -}}
{{- include "tenax.componentName" . -}}
{{- else -}}
default
{{- end -}}
{{- end -}}

{{- define "tenax.etcdName" -}}
{{- include "tenax.componentName" (dict "root" . "component" "etcd") -}}
{{- end -}}

{{/* The headless Service that gives each etcd member a stable DNS name for peering. */}}
{{- define "tenax.etcdPeerService" -}}
{{- printf "%s-peer" (include "tenax.etcdName" .) -}}
{{- end -}}

{{/*
The --etcd value. Bundled: the client Service, which balances over ready
members, so clients survive a member loss. External: the endpoints joined
with commas.
*/}}
{{- define "tenax.etcdEndpoints" -}}
{{- if .Values.etcd.bundled.enabled -}}
{{- printf "%s://%s.%s.svc:%d" (include "tenax.etcdScheme" .) (include "tenax.etcdName" .) .Release.Namespace (int .Values.etcd.bundled.clientPort) -}}
{{- else -}}
{{- join "," .Values.etcd.external.endpoints -}}
{{- end -}}
{{- end -}}

{{/* "true" when the bundled etcd serves TLS and asks clients for certificates (the default). */}}
{{- define "tenax.etcdBundledTLS" -}}
{{- if and .Values.etcd.bundled.enabled .Values.etcd.bundled.tls.enabled -}}true{{- end -}}
{{- end -}}

{{- define "tenax.etcdScheme" -}}
{{- if include "tenax.etcdBundledTLS" . -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/* "true" when the controller and agents talk to etcd with TLS client certificates. */}}
{{- define "tenax.etcdClientTLS" -}}
{{- if or (include "tenax.etcdBundledTLS" .) .Values.etcd.tls.enabled -}}true{{- end -}}
{{- end -}}

{{/* The bundled etcd's own certificate (server and peer) and the client certificate it accepts. */}}
{{- define "tenax.etcdServerTLSSecretName" -}}
{{- printf "%s-server-tls" (include "tenax.etcdName" .) -}}
{{- end -}}

{{- define "tenax.etcdTLSSecretName" -}}
{{- if include "tenax.etcdBundledTLS" . -}}
{{- printf "%s-client-tls" (include "tenax.etcdName" .) -}}
{{- else -}}
{{- .Values.etcd.tls.existingSecret | default (printf "%s-tls" (include "tenax.etcdName" .)) -}}
{{- end -}}
{{- end -}}

{{- define "tenax.etcdTLSDir" -}}/etc/tenax/etcd-tls{{- end -}}

{{/*
etcd connection flags shared by the controller and the agent (a YAML list
fragment). The TLS flag names are those of controller/security.py.
*/}}
{{- define "tenax.etcdArgs" -}}
- --etcd
- {{ include "tenax.etcdEndpoints" . | quote }}
{{- if include "tenax.etcdClientTLS" . }}
- --etcd-ca
- {{ include "tenax.etcdTLSDir" . }}/ca.crt
- --etcd-cert
- {{ include "tenax.etcdTLSDir" . }}/tls.crt
- --etcd-key
- {{ include "tenax.etcdTLSDir" . }}/tls.key
{{- end }}
{{- end -}}

{{- define "tenax.etcdTLSVolume" -}}
{{- if include "tenax.etcdClientTLS" . }}
- name: etcd-tls
  secret:
    secretName: {{ include "tenax.etcdTLSSecretName" . }}
    # Group-readable only: fsGroup lets the non-root user read the key.
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "tenax.etcdTLSVolumeMount" -}}
{{- if include "tenax.etcdClientTLS" . }}
- name: etcd-tls
  mountPath: {{ include "tenax.etcdTLSDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Downward API: pod identity that the commands' flags refer to as $(VAR). */}}
{{- define "tenax.downwardEnv" -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: NODE_NAME
  valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
- name: POD_IP
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
{{- end -}}

{{/* A values map as a container env list, sorted by name for stable output. */}}
{{- define "tenax.envList" -}}
{{- range $k, $v := . }}
- name: {{ $k }}
  value: {{ $v | toString | quote }}
{{- end }}
{{- end -}}

{{/* Roll pods when the shared settings change (env from a ConfigMap is read only at start). */}}
{{- define "tenax.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end -}}

{{/* Global flags that go before the subcommand. */}}
{{- define "tenax.globalArgs" -}}
{{- if .Values.config.verbose }}
- -v
{{- end }}
{{- end -}}

{{/* The controller's API certificate: the operator's Secret, or the one the chart generates. */}}
{{- define "tenax.controllerTLSSecretName" -}}
{{- .Values.controller.tls.existingSecret | default (printf "%s-tls" (include "tenax.componentName" (dict "root" . "component" "controller"))) -}}
{{- end -}}

{{- define "tenax.apiTLSDir" -}}/etc/tenax/api-tls{{- end -}}

{{/* The API is served with TLS: Kubernetes' native gRPC probes speak plaintext only. */}}
{{- define "tenax.apiTLS" -}}
{{- if has .Values.controller.tls.mode (list "tls" "mtls") }}true{{ end -}}
{{- end -}}

{{/* A controller probe: native gRPC health while the API is plaintext, else a TCP check. */}}
{{- define "tenax.controllerProbe" -}}
{{- if include "tenax.apiTLS" . -}}
tcpSocket: {port: grpc}
{{- else -}}
grpc: {port: {{ .Values.controller.grpcPort }}}
{{- end -}}
{{- end -}}
