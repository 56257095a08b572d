{{/*
Chart name, truncated to 63 characters (DNS label limit).
*/}}
{{- define "pwff.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. Truncated to 52 characters so that "-<component>" suffixes still fit in 63.
*/}}
{{- define "pwff.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of a component's resources. Usage: include "pwff.componentName" (list $ "worker")
*/}}
{{- define "pwff.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "pwff.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pwff.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "pwff.labels" -}}
helm.sh/chart: {{ include "pwff.chart" . }}
{{ include "pwff.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pwff
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels (immutable: never add to them).
*/}}
{{- define "pwff.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pwff.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of a component. Usage: include "pwff.componentLabels" (list $ "worker")
*/}}
{{- define "pwff.componentLabels" -}}
{{ include "pwff.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "pwff.componentSelectorLabels" -}}
{{ include "pwff.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "pwff.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pwff.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pwff.secretName" -}}
{{- default (include "pwff.fullname" .) .Values.existingSecret }}
{{- end }}

{{- define "pwff.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
The API token of the chart-created Secret: the configured one, else the one already in the cluster
(so upgrades do not rotate it), else a fresh random one.
*/}}
{{- define "pwff.apiToken" -}}
{{- if .Values.secrets.apiToken }}
{{- .Values.secrets.apiToken }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "pwff.fullname" .) }}
{{- $key := .Values.existingSecretKeys.apiToken }}
{{- if and $existing $existing.data (hasKey $existing.data $key) }}
{{- index $existing.data $key | b64dec }}
{{- else }}
{{- randAlphaNum 40 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Pod annotations that roll the pods when configuration changes. Usage: include "pwff.configChecksums" $
*/}}
{{- define "pwff.configChecksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if .Values.existingSecret }}
checksum/secret: {{ printf "%s/%s" .Values.existingSecret (toJson .Values.existingSecretKeys) | sha256sum }}
{{- else }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
{{- end }}

{{/*
Prometheus scrape annotations. Usage: include "pwff.scrapeAnnotations" (list $ port)
*/}}
{{- define "pwff.scrapeAnnotations" -}}
{{- if (index . 0).Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ index . 1 | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/*
Environment shared by all containers: secrets by key reference. Usage: include "pwff.secretEnv" $
*/}}
{{- define "pwff.secretEnv" -}}
- name: PWFF_RABBITMQ_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "pwff.secretName" . }}
      key: {{ .Values.existingSecretKeys.rabbitmqUrl }}
- name: PWFF_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "pwff.secretName" . }}
      key: {{ .Values.existingSecretKeys.redisUrl }}
{{- end }}

{{/*
Startup/liveness/readiness probes. Usage:
include "pwff.probes" (dict "c" .Values.worker "port" "metrics" "live" "/healthz" "ready" "/healthz")
*/}}
{{- define "pwff.probes" -}}
{{- $c := .c }}
{{- if $c.startupProbe.enabled }}
startupProbe:
  httpGet:
    path: {{ .live }}
    port: {{ .port }}
  {{- toYaml (omit $c.startupProbe "enabled") | nindent 2 }}
{{- end }}
livenessProbe:
  httpGet:
    path: {{ .live }}
    port: {{ .port }}
  {{- toYaml $c.livenessProbe | nindent 2 }}
readinessProbe:
  httpGet:
    path: {{ .ready }}
    port: {{ .port }}
  {{- toYaml $c.readinessProbe | nindent 2 }}
{{- end }}

{{/*
Volumes: cache (emptyDir or PVC) and /tmp. Usage: include "pwff.volumes" .Values.worker
*/}}
{{- define "pwff.volumes" -}}
- name: cache
{{- if .cache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .cache.existingClaim }}
{{- else }}
  emptyDir:
    {{- with .cache.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}
- name: tmp
  emptyDir:
    {{- with .tmpSizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}

{{- define "pwff.volumeMounts" -}}
- name: cache
  mountPath: {{ .Values.config.cacheDir }}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/*
Pod scheduling and misc pod spec fields. Usage: include "pwff.podScheduling" .Values.worker
*/}}
{{- define "pwff.podScheduling" -}}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Pod-level fields common to all components. Usage: include "pwff.podCommon" $
*/}}
{{- define "pwff.podCommon" -}}
serviceAccountName: {{ include "pwff.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/*
Config-level validation that a JSON schema cannot express.
*/}}
{{- define "pwff.validate" -}}
{{- if not .Values.existingSecret }}
{{- if not .Values.secrets.rabbitmqUrl }}
{{- fail "secrets.rabbitmqUrl is required when existingSecret is not set" }}
{{- end }}
{{- if not .Values.secrets.redisUrl }}
{{- fail "secrets.redisUrl is required when existingSecret is not set" }}
{{- end }}
{{- end }}
{{- if and .Values.worker.autoscaling.enabled (gt (int .Values.worker.autoscaling.minReplicas) (int .Values.worker.autoscaling.maxReplicas)) }}
{{- fail "worker.autoscaling.minReplicas must not exceed maxReplicas" }}
{{- end }}
{{- end }}
