{{/*
Expand the name of the chart.
*/}}
{{- define "cdc-service.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "cdc-service.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "cdc-service.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "cdc-service.labels" -}}
helm.sh/chart: {{ include "cdc-service.chart" . }}
{{ include "cdc-service.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "cdc-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cdc-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "cdc-service.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cdc-service.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the Secret that holds .secrets.toml: the existing one, or the chart's.
*/}}
{{- define "cdc-service.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "cdc-service.fullname" .) }}
{{- end }}

{{/*
The effective settings as JSON: settingsToml (parsed) with the `settings` overrides merged over it. Used for what
the chart itself must agree with (the HTTP port, the drain deadline); the service reads the files and variables.
*/}}
{{- define "cdc-service.effectiveSettings" -}}
{{- $file := fromToml .Values.settingsToml }}
{{- if hasKey $file "Error" }}
{{- fail (printf "settingsToml is not valid TOML: %s" (get $file "Error")) }}
{{- end }}
{{- mustMergeOverwrite (deepCopy $file) (deepCopy .Values.settings) | toJson }}
{{- end }}

{{/*
The port of /metrics and the probes: the effective http.port (8080 when unset).
*/}}
{{- define "cdc-service.httpPort" -}}
{{- $settings := include "cdc-service.effectiveSettings" . | fromJson }}
{{- dig "http" "port" 8080 $settings | int }}
{{- end }}

{{/*
The `settings` overrides as env entries CDC_<SECTION>__<KEY>[__<KEY>...]. Strings are passed as they are, every
other value as JSON (numbers without exponent, lists as JSON arrays), which dynaconf parses back to its type.
Called with (dict "prefix" "CDC_" "values" .Values.settings).
*/}}
{{- define "cdc-service.settingsEnv" -}}
{{- $prefix := .prefix }}
{{- range $key, $value := .values }}
{{- $name := printf "%s%s" $prefix (upper $key) }}
{{- if kindIs "map" $value }}
{{- include "cdc-service.settingsEnv" (dict "prefix" (printf "%s__" $name) "values" $value) }}
{{- else if not (kindIs "invalid" $value) }}
- name: {{ $name }}
  value: {{ ternary $value (toRawJson $value) (kindIs "string" $value) | quote }}
{{- end }}
{{- end }}
{{- end }}
