{{/*
Names and labels of every object the chart renders, and the pieces the pod templates share.
Other templates call:
  include "payguard.fullname" .
  include "payguard.labels" .
  include "payguard.selectorLabels" .
  include "payguard.componentLabels" (dict "context" $ "component" "api")    # or (list $ "api")
  include "payguard.componentSelectorLabels" (dict "context" $ "component" "api")
  include "payguard.componentName" (dict "context" $ "component" "api")     # <fullname>-api
  include "payguard.prometheusOperator" .   # "true" when monitoring objects are rendered, else ""
*/}}

{{- define "payguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-payguard, or the release name alone when it already says payguard; 63 characters at most. */}}
{{- define "payguard.fullname" -}}
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

{{- define "payguard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The labels every object carries. */}}
{{- define "payguard.labels" -}}
helm.sh/chart: {{ include "payguard.chart" . }}
{{ include "payguard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: payguard
{{- end }}

{{/* What selects this release's objects; never changes after install (selectors are immutable). */}}
{{- define "payguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "payguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
A component's labels and name. The argument is (dict "context" $ "component" "api") or (list $ "api");
the unpacking is repeated in each define because a template returns text, not the root context.
*/}}
{{- define "payguard.componentLabels" -}}
{{- $ctx := . }}{{ $component := "" }}
{{- if kindIs "slice" . }}{{ $ctx = index . 0 }}{{ $component = index . 1 }}{{ else }}{{ $ctx = .context }}{{ $component = .component }}{{ end }}
{{- include "payguard.labels" $ctx }}
app.kubernetes.io/component: {{ $component }}
{{- end }}

{{- define "payguard.componentSelectorLabels" -}}
{{- $ctx := . }}{{ $component := "" }}
{{- if kindIs "slice" . }}{{ $ctx = index . 0 }}{{ $component = index . 1 }}{{ else }}{{ $ctx = .context }}{{ $component = .component }}{{ end }}
{{- include "payguard.selectorLabels" $ctx }}
app.kubernetes.io/component: {{ $component }}
{{- end }}

{{- define "payguard.componentName" -}}
{{- $ctx := . }}{{ $component := "" }}
{{- if kindIs "slice" . }}{{ $ctx = index . 0 }}{{ $component = index . 1 }}{{ else }}{{ $ctx = .context }}{{ $component = .component }}{{ end }}
{{- printf "%s-%s" (include "payguard.fullname" $ctx) $component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
"true" when the Prometheus Operator objects are rendered: monitoring.prometheusOperator is always, or
auto and the cluster serves monitoring.coreos.com/v1 (helm template: --api-versions monitoring.coreos.com/v1).
*/}}
{{- define "payguard.prometheusOperator" -}}
{{- $mode := .Values.monitoring.prometheusOperator }}
{{- if or (eq $mode "always") (and (eq $mode "auto") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) }}true{{ end }}
{{- end }}

{{- define "payguard.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "payguard.operatorImage" -}}
{{- printf "%s:%s" .Values.operatorImage.repository (default .Chart.AppVersion .Values.operatorImage.tag) }}
{{- end }}

{{- define "payguard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "payguard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "payguard.operatorServiceAccountName" -}}
{{- default (include "payguard.componentName" (list . "operator")) .Values.operator.serviceAccount.name }}
{{- end }}

{{/* The Secret rendered from secrets.values when secrets.create is true. */}}
{{- define "payguard.secretName" -}}
{{- printf "%s-secrets" (include "payguard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The CloudNativePG Cluster's name; CloudNativePG makes the Secret <name>-app with the app's `uri`. */}}
{{- define "payguard.cnpgCluster" -}}
{{- printf "%s-db" (include "payguard.fullname" .) | trunc 50 | trimSuffix "-" }}
{{- end }}

{{/*
Where a secret value comes from, as JSON {"name", "key"}, or "" when nowhere:
(list $ existingSecret keyInIt keyInTheChartsSecret). An existing Secret wins; otherwise the chart's
own Secret when secrets.create is on and secrets.values has that key filled.
*/}}
{{- define "payguard.secretRef" -}}
{{- $ctx := index . 0 }}{{ $existing := index . 1 }}{{ $key := index . 2 }}{{ $own := index . 3 }}
{{- if $existing }}
{{- dict "name" $existing "key" $key | toJson }}
{{- else if and $ctx.Values.secrets.create (index $ctx.Values.secrets.values $own) }}
{{- dict "name" (include "payguard.secretName" $ctx) "key" $own | toJson }}
{{- end }}
{{- end }}

{{- define "payguard.databaseRef" -}}
{{- if .Values.postgresql.cloudnative.enabled }}
{{- dict "name" (printf "%s-app" (include "payguard.cnpgCluster" .)) "key" "uri" | toJson }}
{{- else }}
{{- $ref := include "payguard.secretRef" (list . .Values.database.existingSecret .Values.database.key "DATABASE_URL") }}
{{- required "no database: set database.existingSecret, or secrets.create with secrets.values.DATABASE_URL, or postgresql.cloudnative.enabled" $ref }}
{{- end }}
{{- end }}

{{- define "payguard.stripeRef" -}}
{{- include "payguard.secretRef" (list . .Values.stripe.existingSecret .Values.stripe.secretKeyKey "STRIPE_SECRET_KEY") }}
{{- end }}

{{/* One env entry read from a Secret: (list "NAME" refJson). */}}
{{- define "payguard.secretEnv" -}}
{{- $ref := index . 1 | fromJson -}}
- name: {{ index . 0 }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name | quote }}
      key: {{ $ref.key | quote }}
{{- end }}

{{/* The environment of every payguard container: secrets by secretKeyRef, the rest plain. */}}
{{- define "payguard.env" -}}
{{ include "payguard.secretEnv" (list "DATABASE_URL" (include "payguard.databaseRef" .)) }}
{{- $jwt := include "payguard.secretRef" (list . .Values.auth.existingSecret .Values.auth.jwtSecretKey "PAYGUARD_JWT_SECRET") }}
{{- if $jwt }}
{{ include "payguard.secretEnv" (list "PAYGUARD_JWT_SECRET" $jwt) }}
{{- else if not .Values.auth.jwksUrl }}
{{- fail "no way to check tokens: set auth.existingSecret (or secrets.create with secrets.values.PAYGUARD_JWT_SECRET), or auth.jwksUrl" }}
{{- end }}
{{- with .Values.auth.jwksUrl }}
- name: PAYGUARD_JWKS_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.auth.audience }}
- name: PAYGUARD_JWT_AUDIENCE
  value: {{ . | quote }}
{{- end }}
{{- with .Values.auth.issuer }}
- name: PAYGUARD_JWT_ISSUER
  value: {{ . | quote }}
{{- end }}
{{- with include "payguard.stripeRef" . }}
{{ include "payguard.secretEnv" (list "STRIPE_SECRET_KEY" .) }}
{{- end }}
{{- with include "payguard.secretRef" (list . .Values.stripe.existingSecret .Values.stripe.webhookSecretsKey "STRIPE_WEBHOOK_SECRETS") }}
{{ include "payguard.secretEnv" (list "STRIPE_WEBHOOK_SECRETS" .) }}
{{- end }}
{{- with .Values.stripe.apiBase }}
- name: STRIPE_API_BASE
  value: {{ . | quote }}
{{- end }}
{{- with .Values.stripe.apiVersion }}
- name: STRIPE_API_VERSION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.smtp.host }}
- name: SMTP_HOST
  value: {{ . | quote }}
- name: SMTP_PORT
  value: {{ $.Values.smtp.port | quote }}
- name: SMTP_STARTTLS
  value: {{ $.Values.smtp.starttls | quote }}
{{- with $.Values.smtp.username }}
- name: SMTP_USERNAME
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- with include "payguard.secretRef" (list . .Values.smtp.existingSecret .Values.smtp.passwordKey "SMTP_PASSWORD") }}
{{ include "payguard.secretEnv" (list "SMTP_PASSWORD" .) }}
{{- end }}
- name: MAIL_FROM
  value: {{ .Values.smtp.mailFrom | quote }}
- name: PAYGUARD_RETRY_DRIVER
  value: {{ ternary "kubernetes" "local" .Values.operator.enabled }}
{{- range $name, $value := .Values.config }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* The pod-level fields every payguard pod shares (non-root, the default seccomp profile, /tmp). */}}
{{- define "payguard.podSpec" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ .Values.podSecurityContext.runAsUser }}
  runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
  fsGroup: {{ .Values.podSecurityContext.fsGroup }}
  seccompProfile:
    type: RuntimeDefault
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . | quote }}
{{- end }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  - name: tmp
    emptyDir:
      sizeLimit: 64Mi
{{- end }}

{{/* Every payguard container: read-only root filesystem, no privilege, no capability; /tmp writable. */}}
{{- define "payguard.containerSecurity" -}}
securityContext:
  runAsNonRoot: true
  readOnlyRootFilesystem: true
  allowPrivilegeEscalation: false
  capabilities:
    drop: [ALL]
  seccompProfile:
    type: RuntimeDefault
volumeMounts:
  - name: tmp
    mountPath: /tmp
{{- end }}

{{/* Pod metadata: (list $ "component"). A chart-made Secret's checksum restarts pods when it changes. */}}
{{- define "payguard.podMetadata" -}}
{{- $ctx := index . 0 -}}
labels:
  {{- include "payguard.componentLabels" . | nindent 2 }}
  {{- with $ctx.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if or $ctx.Values.podAnnotations $ctx.Values.secrets.create }}
annotations:
  {{- with $ctx.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- if $ctx.Values.secrets.create }}
  checksum/secrets: {{ toJson $ctx.Values.secrets.values | sha256sum }}
  {{- end }}
{{- end }}
{{- end }}

{{/* topologySpreadConstraints from a component's topologySpread values: (list $ "component" values). */}}
{{- define "payguard.topologySpread" -}}
{{- $spread := index . 2 }}
{{- if $spread.enabled -}}
topologySpreadConstraints:
{{- range $spread.topologyKeys }}
  - maxSkew: {{ $spread.maxSkew }}
    topologyKey: {{ . | quote }}
    whenUnsatisfiable: {{ $spread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "payguard.componentSelectorLabels" (list (index $ 0) (index $ 1)) | nindent 8 }}
{{- end }}
{{- end }}
{{- end }}
