{{/*
Names, labels, images and settings shared by every template.
*/}}

{{/* The chart name, overridable. */}}
{{- define "histoloop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; 63 characters at most (DNS label). */}}
{{- define "histoloop.fullname" -}}
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
A component's resource name: the full name shortened so that "-<component>" always
fits in 63 characters (two components never collide after truncation).
Call with (dict "root" $ "component" "tiling").
*/}}
{{- define "histoloop.componentName" -}}
{{- $max := int (sub 62 (len .component)) }}
{{- printf "%s-%s" (include "histoloop.fullname" .root | trunc $max | trimSuffix "-") .component }}
{{- end }}

{{- define "histoloop.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of the release (never change after install). */}}
{{- define "histoloop.selectorLabels" -}}
app.kubernetes.io/name: {{ include "histoloop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "histoloop.labels" -}}
helm.sh/chart: {{ include "histoloop.chart" . }}
{{ include "histoloop.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: histoloop
{{- end }}

{{/* Selector labels of one component. Call with (dict "root" $ "component" "tiling"). */}}
{{- define "histoloop.componentSelectorLabels" -}}
{{ include "histoloop.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of one component. Call with (dict "root" $ "component" "tiling"). */}}
{{- define "histoloop.componentLabels" -}}
{{ include "histoloop.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
An image reference: the base image block with a service's overrides on top; a digest
wins over a tag, an empty tag means the chart's appVersion.
Call with (dict "root" $ "image" .Values.image "override" .Values.tiling.image).
*/}}
{{- define "histoloop.image" -}}
{{- $img := merge (deepCopy (default (dict) .override)) (deepCopy .image) }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (toString (default .root.Chart.AppVersion $img.tag)) }}
{{- end }}
{{- end }}

{{- define "histoloop.imagePullPolicy" -}}
{{- $img := merge (deepCopy (default (dict) .override)) (deepCopy .image) }}
{{- default "IfNotPresent" $img.pullPolicy }}
{{- end }}

{{/* Name of the Secret holding the services' credentials. */}}
{{- define "histoloop.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- printf "%s-secrets" (include "histoloop.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "histoloop.configMapName" -}}
{{- printf "%s-config" (include "histoloop.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Kafka bootstrap servers: the bundled broker or config.kafkaBootstrap (required). */}}
{{- define "histoloop.kafkaBootstrap" -}}
{{- if .Values.bundled.kafka.enabled }}
{{- printf "%s:9092" (include "histoloop.componentName" (dict "root" . "component" "kafka")) }}
{{- else }}
{{- required "config.kafkaBootstrap is required (the facility's Kafka, host:port[,host:port]) unless bundled.kafka.enabled=true" .Values.config.kafkaBootstrap }}
{{- end }}
{{- end }}

{{/* MinIO endpoint: the bundled MinIO or config.minioEndpoint (required). */}}
{{- define "histoloop.minioEndpoint" -}}
{{- if .Values.bundled.minio.enabled }}
{{- printf "%s:9000" (include "histoloop.componentName" (dict "root" . "component" "minio")) }}
{{- else }}
{{- required "config.minioEndpoint is required (the facility's MinIO/S3, host:port without scheme) unless bundled.minio.enabled=true" .Values.config.minioEndpoint }}
{{- end }}
{{- end }}

{{/* Triton gRPC address: config.tritonUrl or the chart's Triton. */}}
{{- define "histoloop.tritonUrl" -}}
{{- if .Values.config.tritonUrl }}
{{- .Values.config.tritonUrl }}
{{- else if .Values.triton.enabled }}
{{- printf "%s:8001" (include "histoloop.componentName" (dict "root" . "component" "triton")) }}
{{- else if and .Values.embedding.enabled (not (has (toString (default "" .Values.embedding.env.HISTOLOOP_EMBEDDER)) (list "onnx" "efficientnet" "handcrafted"))) }}
{{- fail "config.tritonUrl is required when triton.enabled=false (or set embedding.env.HISTOLOOP_EMBEDDER=efficientnet, or onnx with HISTOLOOP_MODEL_PATH)" }}
{{- end }}
{{- end }}

{{/* The database URL a chart-made Secret carries. */}}
{{- define "histoloop.databaseUrl" -}}
{{- if .Values.secrets.databaseUrl }}
{{- .Values.secrets.databaseUrl }}
{{- else if .Values.bundled.postgresql.enabled }}
{{- $password := required "bundled.postgresql.password is required when bundled.postgresql.enabled=true" .Values.bundled.postgresql.password }}
{{- printf "postgresql+psycopg://histoloop:%s@%s:5432/histoloop" $password (include "histoloop.componentName" (dict "root" . "component" "postgresql")) }}
{{- else }}
{{- required "secrets.databaseUrl is required (postgresql+psycopg://user:password@host:5432/histoloop) unless secrets.existingSecret is set or bundled.postgresql.enabled=true" .Values.secrets.databaseUrl }}
{{- end }}
{{- end }}

{{/*
A secret value given in values: required, and not a placeholder that histoloop would
refuse at start anyway. Call with (list "secrets.serviceToken" .Values.secrets.serviceToken).
*/}}
{{- define "histoloop.secretValue" -}}
{{- $name := index . 0 }}
{{- $value := required (printf "%s is required unless secrets.existingSecret is set" $name) (index . 1) }}
{{- if has (lower (trim $value)) (list "changeme" "change-me" "changethis" "password" "secret" "minioadmin" "admin" "test") }}
{{- fail (printf "%s is a placeholder value; histoloop refuses it in distributed mode" $name) }}
{{- end }}
{{- $value }}
{{- end }}

{{/*
Non-secret settings as a YAML map (the ConfigMap's data, and the migration Job's env).
*/}}
{{- define "histoloop.configData" -}}
HISTOLOOP_MODE: distributed
HISTOLOOP_GRPC_HOST: 0.0.0.0
HISTOLOOP_GRPC_PORT: "50051"
HISTOLOOP_METRICS_PORT: "9464"
HISTOLOOP_DATA_DIR: /var/lib/histoloop
HISTOLOOP_GRACE_SECONDS: {{ .Values.config.graceSeconds | quote }}
HISTOLOOP_LOG_LEVEL: {{ .Values.config.logLevel | quote }}
HISTOLOOP_LOG_FORMAT: {{ .Values.config.logFormat | quote }}
HISTOLOOP_KAFKA_BOOTSTRAP: {{ include "histoloop.kafkaBootstrap" . | quote }}
HISTOLOOP_KAFKA_TOPIC_PREFIX: {{ .Values.config.kafkaTopicPrefix | quote }}
HISTOLOOP_MINIO_ENDPOINT: {{ include "histoloop.minioEndpoint" . | quote }}
HISTOLOOP_MINIO_BUCKET: {{ .Values.config.minioBucket | quote }}
HISTOLOOP_MINIO_SECURE: {{ and .Values.config.minioSecure (not .Values.bundled.minio.enabled) | quote }}
{{- with .Values.config.minioRegion }}
HISTOLOOP_MINIO_REGION: {{ . | quote }}
{{- end }}
{{- with include "histoloop.tritonUrl" . }}
HISTOLOOP_TRITON_URL: {{ . | quote }}
{{- end }}
HISTOLOOP_TRITON_MODEL: {{ .Values.config.tritonModel | quote }}
{{- with .Values.config.tritonModelVersion }}
HISTOLOOP_TRITON_MODEL_VERSION: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
Environment entries for the services' secrets. Call with
(dict "root" $ "database" true) — database adds HISTOLOOP_DATABASE_URL.
*/}}
{{- define "histoloop.secretEnv" -}}
{{- $secret := include "histoloop.secretName" .root }}
{{- $keys := list "HISTOLOOP_MINIO_ACCESS_KEY" "HISTOLOOP_MINIO_SECRET_KEY" "HISTOLOOP_SERVICE_TOKEN" }}
{{- if .database }}
{{- $keys = append $keys "HISTOLOOP_DATABASE_URL" }}
{{- end }}
{{- range $keys }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ . }}
{{- end }}
- name: HISTOLOOP_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: HISTOLOOP_ADMIN_TOKEN
      optional: true
{{- end }}

{{/* Pod annotations for Prometheus' kubernetes-pods scrape job (when no ServiceMonitor). */}}
{{- define "histoloop.scrapeAnnotations" -}}
{{- if not .root.Values.metrics.serviceMonitor.enabled }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}
