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
app.kubernetes.io/version: {{ include "cdc-service.version" . | quote }}
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
other value as JSON (numbers without exponent, lists as JSON arrays), which the service parses as the setting's
declared type.
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

{{/*
The version label: the image tag (the chart's appVersion when empty), cut to a valid label value.
*/}}
{{- define "cdc-service.version" -}}
{{- .Values.image.tag | default .Chart.AppVersion | replace "+" "_" | trunc 63 | trimSuffix "-" | trimSuffix "_" | trimSuffix "." }}
{{- end }}

{{/*
The image reference: repository@digest when image.digest is set (the tag is then ignored), else repository:tag.
*/}}
{{- define "cdc-service.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
"true" when the credentials come from individual keys of secrets.existingSecret (secrets.existingSecretKeys).
*/}}
{{- define "cdc-service.perKeySecrets" -}}
{{- $keys := .Values.secrets.existingSecretKeys }}
{{- if and .Values.secrets.existingSecret (or $keys.nats.password $keys.nats.token $keys.redis.password) }}true{{ end }}
{{- end }}

{{/*
Env entries for secrets.existingSecretKeys. Each key is read into SECRET_<SECTION>_<KEY>, then handed to the service
as CDC_<SECTION>__<KEY>="$(SECRET_...)": the kubelet substitutes the value, and the service takes a string setting
from a variable exactly as written ("1_000" stays text, "true" is not a boolean).
*/}}
{{- define "cdc-service.secretKeyEnv" -}}
{{- $secret := .Values.secrets.existingSecret }}
{{- range $section, $keys := .Values.secrets.existingSecretKeys }}
{{- range $name, $key := $keys }}
{{- if $key }}
{{- $var := printf "SECRET_%s_%s" (upper $section) (upper $name) }}
- name: {{ $var }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $key }}
- name: {{ printf "CDC_%s__%s" (upper $section) (upper $name) }}
  value: {{ printf "$(%s)" $var | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"true" when the chart's own Secret holds a credential.
*/}}
{{- define "cdc-service.hasCredentials" -}}
{{- $s := .Values.secrets }}
{{- if and (not $s.existingSecret) (or $s.nats.password $s.nats.token $s.redis.password) }}true{{ end }}
{{- end }}

{{/*
The salt of the checksum/secret annotation, so that the annotation (readable by anyone who can read the pod) cannot
be used to guess a weak password offline. secrets.checksumSalt when set; else the salt stored in the release's Secret
(stable across upgrades); else a new random one, remembered for the rest of this render. "" when the chart's Secret
holds no credential: there is nothing to protect, and the annotation stays reproducible.
*/}}
{{- define "cdc-service.checksumSalt" -}}
{{- if include "cdc-service.hasCredentials" . }}
{{- if not (hasKey .Values.secrets "_salt") }}
{{- $salt := .Values.secrets.checksumSalt }}
{{- if not $salt }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "cdc-service.fullname" .) }}
{{- $salt = dig "data" "checksum-salt" "" $existing | b64dec }}
{{- end }}
{{- $_ := set .Values.secrets "_salt" ($salt | default (randAlphaNum 32)) }}
{{- end }}
{{- .Values.secrets._salt }}
{{- end }}
{{- end }}

{{/*
The checksum/secret annotation: a salted SHA-256 of the chart's Secret.
*/}}
{{- define "cdc-service.secretChecksum" -}}
{{- $body := include (print $.Template.BasePath "/secret.yaml") . }}
{{- printf "%s%s" (include "cdc-service.checksumSalt" .) $body | sha256sum }}
{{- end }}

{{/*
The TCP ports of a list of URLs (a list, or one string with comma-separated URLs), each URL's own or the default.
Called with (dict "urls" ... "default" 4222); returns a JSON list of unique ports.
*/}}
{{- define "cdc-service.urlPorts" -}}
{{- $urls := .urls }}
{{- if kindIs "string" $urls }}{{ $urls = splitList "," $urls }}{{ end }}
{{- $ports := list }}
{{- range $urls }}
{{- $hostport := (urlParse (trim .)).host | default "" }}
{{- $port := regexFind ":[0-9]+$" $hostport | trimPrefix ":" }}
{{- $ports = append $ports ($port | default $.default | int) }}
{{- end }}
{{- $ports | uniq | toJson }}
{{- end }}

{{/*
Labels of the `helm test` pod. Not the selector labels: the Service must not send traffic to it.
*/}}
{{- define "cdc-service.testLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: helm-test
{{- end }}
