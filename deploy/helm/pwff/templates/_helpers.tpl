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
The CUDA image of GPU workers: image.cudaDigest, else "<tag>-<cudaVariant>" (what
`docker build --build-arg TORCH_VARIANT=<cudaVariant>` is tagged in the README).
*/}}
{{- define "pwff.cudaImage" -}}
{{- $tag := printf "%s-%s" (default .Chart.AppVersion .Values.image.tag) .Values.image.cudaVariant }}
{{- if .Values.image.cudaDigest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.cudaDigest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
A value of the chart-created Secret: the configured one, else the one already in the cluster (so
upgrades do not rotate it), else a fresh random one. Call it once per render and keep the result: every
call draws a new random value. Usage: include "pwff.secretValue" (list $ key configured length)
*/}}
{{- define "pwff.secretValue" -}}
{{- $root := index . 0 }}
{{- $key := index . 1 }}
{{- if index . 2 }}
{{- index . 2 }}
{{- else }}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace (include "pwff.fullname" $root) }}
{{- if and $existing $existing.data (hasKey $existing.data $key) }}
{{- index $existing.data $key | b64dec }}
{{- else }}
{{- randAlphaNum (index . 3) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The API token of the chart-created Secret (see pwff.secretValue).
*/}}
{{- define "pwff.apiToken" -}}
{{- include "pwff.secretValue" (list . .Values.existingSecretKeys.apiToken .Values.secrets.apiToken 40) }}
{{- end }}

{{/*
Host names of the in-chart RabbitMQ and Redis Services.
*/}}
{{- define "pwff.rabbitmqHost" -}}
{{- include "pwff.componentName" (list . "rabbitmq") }}
{{- end }}

{{- define "pwff.redisHost" -}}
{{- include "pwff.componentName" (list . "redis") }}
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
PWFF_BUS_SECRET for the services that publish or consume bus messages (not the scaler): the key
of every message's MAC (shared.signing). Usage: include "pwff.busSecretEnv" $
*/}}
{{- define "pwff.busSecretEnv" -}}
- name: PWFF_BUS_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "pwff.secretName" . }}
      key: {{ .Values.existingSecretKeys.busSecret }}
{{- end }}

{{/*
The Secret holding the tenants file, or "" when the API token alone is the only tenant.
*/}}
{{- define "pwff.tenantsSecretName" -}}
{{- if .Values.auth.tenantsSecret }}
{{- .Values.auth.tenantsSecret }}
{{- else if .Values.auth.tenants }}
{{- include "pwff.componentName" (list . "tenants") }}
{{- end }}
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

{{/*
Volumes of a component: its model cache (emptyDir, existingClaim, or the claim the chart creates with
cache.type pvc) and /tmp. Usage: include "pwff.componentVolumes" (list $ "worker")
*/}}
{{- define "pwff.componentVolumes" -}}
{{- $root := index . 0 }}
{{- $c := index $root.Values (index . 1) }}
- name: cache
{{- if $c.cache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ $c.cache.existingClaim }}
{{- else if eq (default "emptyDir" $c.cache.type) "pvc" }}
  persistentVolumeClaim:
    claimName: {{ include "pwff.componentName" (list $root (printf "%s-cache" (index . 1))) }}
{{- else }}
  emptyDir:
    {{- with $c.cache.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}
- name: tmp
  emptyDir:
    {{- with $c.tmpSizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}

{{/*
CPUs of a quantity ("2", 2, "1500m", "0.5"), as a float. Usage: include "pwff.cpus" "1500m"
*/}}
{{- define "pwff.cpus" -}}
{{- $q := toString . }}
{{- if hasSuffix "m" $q }}
{{- divf (float64 (trimSuffix "m" $q)) 1000.0 }}
{{- else }}
{{- float64 $q }}
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
An init container that waits until the in-chart RabbitMQ and Redis accept connections: on a fresh
cluster their volumes are provisioned and they boot while the services start, and a service that
gave up connecting would crash-loop into ever longer back-offs. Nothing when both are external.
Usage: include "pwff.waitForStores" (list $ image)
*/}}
{{- define "pwff.waitForStores" -}}
{{- $root := index . 0 }}
{{- $targets := list }}
{{- if $root.Values.rabbitmq.enabled }}
{{- $targets = append $targets (printf "%s:5672" (include "pwff.rabbitmqHost" $root)) }}
{{- end }}
{{- if $root.Values.redis.enabled }}
{{- $targets = append $targets (printf "%s:6379" (include "pwff.redisHost" $root)) }}
{{- end }}
{{- if $targets }}
initContainers:
  - name: wait-for-stores
    image: {{ index . 1 }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    command:
      - python
      - -c
      - |
        import socket, sys, time
        for target in sys.argv[1:]:
            host, port = target.rsplit(":", 1)
            while True:
                try:
                    socket.create_connection((host, int(port)), timeout=3).close()
                    print(f"{target} accepts connections", flush=True)
                    break
                except OSError as error:
                    print(f"waiting for {target}: {error}", flush=True)
                    time.sleep(2)
      {{- range $targets }}
      - {{ . }}
      {{- end }}
    resources:
      requests:
        cpu: 10m
        memory: 32Mi
      limits:
        memory: 128Mi
    securityContext:
      {{- toYaml $root.Values.securityContext | nindent 6 }}
{{- end }}
{{- end }}

{{/*
Config-level validation that a JSON schema cannot express.
*/}}
{{- define "pwff.validate" -}}
{{- if .Values.existingSecret }}
{{- if or .Values.rabbitmq.enabled .Values.redis.enabled }}
{{- fail "existingSecret is for an external RabbitMQ and Redis: set rabbitmq.enabled=false and redis.enabled=false (the in-chart ones keep their passwords in the chart's Secret)" }}
{{- end }}
{{- else }}
{{- if and .Values.rabbitmq.enabled .Values.secrets.rabbitmqUrl }}
{{- fail "secrets.rabbitmqUrl is set while rabbitmq.enabled is true: set rabbitmq.enabled=false to use an external RabbitMQ" }}
{{- end }}
{{- if and .Values.redis.enabled .Values.secrets.redisUrl }}
{{- fail "secrets.redisUrl is set while redis.enabled is true: set redis.enabled=false to use an external Redis" }}
{{- end }}
{{- if not (or .Values.rabbitmq.enabled .Values.secrets.rabbitmqUrl) }}
{{- fail "secrets.rabbitmqUrl is required when rabbitmq.enabled is false and existingSecret is not set" }}
{{- end }}
{{- if not (or .Values.redis.enabled .Values.secrets.redisUrl) }}
{{- fail "secrets.redisUrl is required when redis.enabled is false and existingSecret is not set" }}
{{- end }}
{{- end }}
{{- $w := .Values.worker }}
{{- $requests := default dict $w.resources.requests }}
{{- $limits := default dict $w.resources.limits }}
{{- if and (hasKey $requests "cpu") (hasKey $limits "cpu") (ne (include "pwff.cpus" $requests.cpu) (include "pwff.cpus" $limits.cpu)) }}
{{- fail "worker.resources: keep the CPU limit equal to the request (torch sizes its threads from them)" }}
{{- end }}
{{- if and $w.torchThreads (hasKey $limits "cpu") (gt (float64 $w.torchThreads) (ceil (float64 (include "pwff.cpus" $limits.cpu)))) }}
{{- fail "worker.torchThreads exceeds the worker's CPU limit: the extra threads would only wait for each other" }}
{{- end }}
{{- if and .Values.worker.autoscaling.enabled (gt (int .Values.worker.autoscaling.minReplicas) (int .Values.worker.autoscaling.maxReplicas)) }}
{{- fail "worker.autoscaling.minReplicas must not exceed maxReplicas" }}
{{- end }}
{{- end }}

{{/*
Bound clients' identities (values boundClients): the clients file for the scheduler and the aggregator,
and the scheduler's task-signing key for the scheduler only. Each as env, mounts and volumes.
Usage: include "pwff.identityEnv" (list $ "scheduler")
*/}}
{{- define "pwff.identityEnv" -}}
{{- $b := (index . 0).Values.boundClients }}
{{- if or $b.clientsFile.secretName $b.clientsFile.configMapName }}
- name: PWFF_CLIENTS_FILE
  value: /etc/pwff/clients/clients.yaml
{{- end }}
{{- if and (eq (index . 1) "scheduler") $b.schedulerKey.secretName }}
- name: PWFF_SCHEDULER_KEY
  value: /etc/pwff/scheduler-key/scheduler.key
{{- end }}
{{- end }}

{{- define "pwff.identityMounts" -}}
{{- $b := (index . 0).Values.boundClients }}
{{- if or $b.clientsFile.secretName $b.clientsFile.configMapName }}
{{- /* A folder, not a subPath: the kubelet updates it in place and the services re-read it. */}}
- name: clients-file
  mountPath: /etc/pwff/clients
  readOnly: true
{{- end }}
{{- if and (eq (index . 1) "scheduler") $b.schedulerKey.secretName }}
- name: scheduler-key
  mountPath: /etc/pwff/scheduler-key
  readOnly: true
{{- end }}
{{- end }}

{{- define "pwff.identityVolumes" -}}
{{- $b := (index . 0).Values.boundClients }}
{{- if $b.clientsFile.secretName }}
- name: clients-file
  secret:
    secretName: {{ $b.clientsFile.secretName }}
    items:
      - key: {{ $b.clientsFile.key }}
        path: clients.yaml
{{- else if $b.clientsFile.configMapName }}
- name: clients-file
  configMap:
    name: {{ $b.clientsFile.configMapName }}
    items:
      - key: {{ $b.clientsFile.key }}
        path: clients.yaml
{{- end }}
{{- if and (eq (index . 1) "scheduler") $b.schedulerKey.secretName }}
- name: scheduler-key
  secret:
    secretName: {{ $b.schedulerKey.secretName }}
    {{- /* Owner and the pod's fsGroup only (the services run as non-root with that group). */}}
    defaultMode: 0440
    items:
      - key: {{ $b.schedulerKey.key }}
        path: scheduler.key
{{- end }}
{{- end }}
