{{/*
Render-time checks of values that the schema cannot express. Each failure is one line naming the value. Included
once, from deployment.yaml, so every render (install, upgrade, template, lint) runs them.
*/}}
{{- define "cdc-service.validate" -}}
{{- $settings := include "cdc-service.effectiveSettings" . | fromJson }}

{{- /* Drain deadline: the pod must outlive the drain by a margin that pays for closing threads and connections. */}}
{{- $grace := dig "shutdown" "grace_seconds" 20.0 $settings | float64 }}
{{- if lt (.Values.terminationGracePeriodSeconds | float64) (addf $grace 5) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be at least 5 s greater than shutdown.grace_seconds (%v): the pod would be killed in the middle of the drain or while closing" .Values.terminationGracePeriodSeconds $grace) }}
{{- end }}

{{- /* A loopback address cannot work in a pod: the kubelet and Prometheus reach the pod's IP, and there is no Redis
       next to the service in the pod (Redis failing open would not even make the pods unready). */}}
{{- $httpHost := dig "http" "host" "0.0.0.0" $settings | toString }}
{{- if include "cdc-service.isLoopback" $httpHost }}
{{- fail (printf "settings http.host (%s) is a loopback address: the kubelet's probes and Prometheus could not reach /healthz, /readyz and /metrics; use 0.0.0.0 (or ::)" $httpHost) }}
{{- end }}
{{- $redisHost := include "cdc-service.urlHost" (dig "redis" "url" "" $settings | toString) }}
{{- if include "cdc-service.isLoopback" $redisHost }}
{{- fail (printf "settings redis.url points at %s, a loopback address, i.e. the pod itself: set settings.redis.url to your Redis service (the replicas would run without dedup and stay ready)" $redisHost) }}
{{- end }}

{{- /* Labels and annotations that would override the chart's own. */}}
{{- $own := include "cdc-service.labels" . | fromYaml }}
{{- range $key := keys .Values.podLabels | sortAlpha }}
{{- if hasKey $own $key }}
{{- fail (printf "podLabels.%s: the chart sets this label itself (a selector or common label); a second value would make the API reject the Deployment or detach the pods from their Service and PodDisruptionBudget" $key) }}
{{- end }}
{{- end }}
{{- range $key := keys .Values.podAnnotations | sortAlpha }}
{{- if hasPrefix "checksum/" $key }}
{{- fail (printf "podAnnotations.%s: checksum/* annotations are the chart's own (they roll the pods when the settings change)" $key) }}
{{- end }}
{{- end }}

{{- /* The settings files. The chart names its mounted files in SETTINGS_FILES_FOR_DYNACONF, the one variable every
       image reads (images built before CDC_SETTINGS_FILES existed stop on that one as an unknown setting). A second
       list in extraEnv would replace the chart's (the last of two equal names wins) or contradict it (the service
       refuses the two variables naming different files). */}}
{{- range .Values.extraEnv }}
{{- if has (toString .name) (list "CDC_SETTINGS_FILES" "SETTINGS_FILES_FOR_DYNACONF") }}
{{- fail (printf "extraEnv %s: the chart names the mounted settings files in SETTINGS_FILES_FOR_DYNACONF; a second list would replace or contradict it: put settings in settingsToml or settings" .name) }}
{{- end }}
{{- end }}

{{- /* Autoscalers. */}}
{{- $hpa := .Values.autoscaling }}
{{- if and $hpa.enabled (gt ($hpa.minReplicas | int) ($hpa.maxReplicas | int)) }}
{{- fail (printf "autoscaling.minReplicas (%v) must not exceed autoscaling.maxReplicas (%v)" $hpa.minReplicas $hpa.maxReplicas) }}
{{- end }}
{{- $keda := .Values.keda }}
{{- if and $keda.enabled (gt ($keda.minReplicas | int) ($keda.maxReplicas | int)) }}
{{- fail (printf "keda.minReplicas (%v) must not exceed keda.maxReplicas (%v)" $keda.minReplicas $keda.maxReplicas) }}
{{- end }}
{{- if and $keda.enabled (not $keda.natsServerMonitoringEndpoint) }}
{{- fail "keda.natsServerMonitoringEndpoint is required when keda.enabled: host:port of the NATS server's monitoring endpoint, e.g. nats.nats.svc.cluster.local:8222" }}
{{- end }}
{{- if $keda.enabled }}
{{- $ingest := dig "ingest" (dict) (include "cdc-service.effectiveSettings" . | fromJson) }}
{{- $partitions := dig "partitions" 8 $ingest | int }}
{{- if and (eq (dig "ordering" "replica" $ingest) "partitioned") (gt ($keda.maxReplicas | int) $partitions) }}
{{- fail (printf "keda.maxReplicas (%v) must not exceed ingest.partitions (%d) with ingest.ordering = partitioned: a replica past the partition count owns no partition" $keda.maxReplicas $partitions) }}
{{- end }}
{{- end }}
{{- if and $hpa.enabled $keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled: choose one autoscaler (KEDA creates its own HorizontalPodAutoscaler)" }}
{{- end }}

{{- /* PodDisruptionBudget: exactly one of the two fields, and never one that blocks every eviction. */}}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if $pdb.enabled }}
{{- $min := $pdb.minAvailable }}
{{- $max := $pdb.maxUnavailable }}
{{- if and (not (kindIs "invalid" $min)) (not (kindIs "invalid" $max)) }}
{{- fail "podDisruptionBudget: set only one of minAvailable and maxUnavailable (the API accepts one; leave the other null)" }}
{{- end }}
{{- if and (kindIs "invalid" $min) (kindIs "invalid" $max) }}
{{- $max = 1 }}
{{- end }}
{{- $replicas := include "cdc-service.minReplicas" . }}
{{- if not (kindIs "invalid" $max) }}
{{- if or (and (kindIs "string" $max) (eq (trimSuffix "%" $max | atoi) 0)) (and (not (kindIs "string" $max)) (eq ($max | int) 0)) }}
{{- fail (printf "podDisruptionBudget.maxUnavailable (%v) blocks every eviction: node drains would hang; use at least 1" $max) }}
{{- end }}
{{- else if kindIs "string" $min }}
{{- if ge (trimSuffix "%" $min | atoi) 100 }}
{{- fail (printf "podDisruptionBudget.minAvailable (%v) blocks every eviction: node drains would hang" $min) }}
{{- end }}
{{- else if and $replicas (ge ($min | int) ($replicas | int)) }}
{{- fail (printf "podDisruptionBudget.minAvailable (%v) is not below the smallest replica count (%v): it blocks every eviction and node drains would hang; lower it or use maxUnavailable" $min $replicas) }}
{{- end }}
{{- end }}

{{- $lag := .Values.prometheusRule.lag }}
{{- if le ($lag.criticalSeconds | float64) ($lag.warningSeconds | float64) }}
{{- fail (printf "prometheusRule.lag.criticalSeconds (%v) must be greater than prometheusRule.lag.warningSeconds (%v)" $lag.criticalSeconds $lag.warningSeconds) }}
{{- end }}

{{- /* The metrics port is unauthenticated: keep it inside the cluster unless told otherwise. */}}
{{- if and (ne .Values.service.type "ClusterIP") (not .Values.service.allowExternal) }}
{{- fail (printf "service.type %s would expose the unauthenticated /metrics port outside the cluster: set service.allowExternal=true if you mean it" .Values.service.type) }}
{{- end }}

{{- /* Credentials from individual keys of an existing Secret. */}}
{{- $keys := .Values.secrets.existingSecretKeys }}
{{- if and (or $keys.nats.password $keys.nats.token $keys.redis.password) (not .Values.secrets.existingSecret) }}
{{- fail "secrets.existingSecretKeys needs secrets.existingSecret: the name of the Secret that holds those keys" }}
{{- end }}
{{- end }}

{{/*
The smallest replica count the Deployment can have, or "" when an external autoscaler owns it.
*/}}
{{- define "cdc-service.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}
{{- .Values.autoscaling.minReplicas }}
{{- else if .Values.keda.enabled }}
{{- .Values.keda.minReplicas }}
{{- else if not (kindIs "invalid" .Values.replicaCount) }}
{{- .Values.replicaCount }}
{{- end }}
{{- end }}

{{/*
"true" when the host (name or IP, IPv6 with or without brackets) is a loopback address, else "".
*/}}
{{- define "cdc-service.isLoopback" -}}
{{- $host := . | lower | trimPrefix "[" | trimSuffix "]" }}
{{- if or (eq $host "localhost") (hasSuffix ".localhost" $host) (hasPrefix "127." $host) (eq $host "::1") (eq $host "0:0:0:0:0:0:0:1") }}true{{ end }}
{{- end }}

{{/*
The host of a URL without user info or port ("" when there is none).
*/}}
{{- define "cdc-service.urlHost" -}}
{{- $hostport := (urlParse .).host | default "" }}
{{- $hostport = regexReplaceAll "^.*@" $hostport "" }}
{{- if hasPrefix "[" $hostport }}
{{- regexReplaceAll "^\\[([^\\]]*)\\].*$" $hostport "${1}" }}
{{- else }}
{{- regexReplaceAll ":[0-9]*$" $hostport "" }}
{{- end }}
{{- end }}
