{{/* Names, labels and the pieces every component's pod shares. */}}

{{- define "odpo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "odpo.fullname" -}}
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

{{/* A component's resource name; component names are short, so 50 characters of prefix always fit. */}}
{{- define "odpo.componentName" -}}
{{- printf "%s-%s" (include "odpo.fullname" .root | trunc 50 | trimSuffix "-") .component }}
{{- end }}

{{- define "odpo.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "odpo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: odpo
{{- end }}

{{- define "odpo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "odpo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* dict "root" $ "component" "generator" */}}
{{- define "odpo.componentLabels" -}}
{{ include "odpo.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "odpo.componentSelectorLabels" -}}
{{ include "odpo.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "odpo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "odpo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The CPU image (Dockerfile): `image.tag`, or `<appVersion>-cpu`. */}}
{{- define "odpo.image" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-cpu" .Chart.AppVersion) .Values.image.tag) }}
{{- end }}

{{/* The GPU image (Dockerfile.gpu): `image.gpuTag`, or `<appVersion>-gpu`. */}}
{{- define "odpo.gpuImage" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-gpu" .Chart.AppVersion) .Values.image.gpuTag) }}
{{- end }}

{{- define "odpo.kafkaBootstrap" -}}
{{- if .Values.kafka.tansu.enabled }}
{{- printf "%s.%s.svc:%d" (include "odpo.componentName" (dict "root" . "component" "kafka")) .Release.Namespace (int .Values.kafka.tansu.port) }}
{{- else }}
{{- required "kafka.bootstrapServers is required unless kafka.tansu.enabled is true" .Values.kafka.bootstrapServers }}
{{- end }}
{{- end }}

{{- define "odpo.adapterClaim" -}}
{{- default (printf "%s-adapters" (include "odpo.fullname" .)) .Values.adapterStore.existingClaim }}
{{- end }}

{{- define "odpo.adminSecretName" -}}
{{- default (printf "%s-admin" (include "odpo.fullname" .)) .Values.admin.existingSecret }}
{{- end }}

{{- define "odpo.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "odpo.fullname" .)) .Values.gateway.apiKeys.existingSecret }}
{{- end }}
{{- define "odpo.apiKeysDir" -}}/etc/odpo-api-keys{{- end }}

{{- define "odpo.vllmKeySecretName" -}}
{{- default (printf "%s-vllm" (include "odpo.fullname" .)) .Values.vllm.apiKey.existingSecret }}
{{- end }}

{{/* "true" when the Kafka clients log in (SASL_*), or talk TLS (SSL, SASL_SSL). */}}
{{- define "odpo.kafkaSasl" -}}
{{- if hasPrefix "SASL_" .Values.kafka.security.protocol }}true{{ end }}
{{- end }}
{{- define "odpo.kafkaTls" -}}
{{- if has .Values.kafka.security.protocol (list "SSL" "SASL_SSL") }}true{{ end }}
{{- end }}

{{/* Values that render but cannot work: refused with a message. */}}
{{- define "odpo.validate" -}}
{{- $sec := .Values.kafka.security }}
{{- if and .Values.kafka.tansu.enabled (ne $sec.protocol "PLAINTEXT") }}
{{- fail (printf "kafka.security.protocol %s: the bundled kafka.tansu speaks PLAINTEXT only (its NetworkPolicy admits odpo's pods alone)" $sec.protocol) }}
{{- end }}
{{- if and .Values.kafka.tansu.enabled (gt (int .Values.kafka.replicationFactor) 1) }}
{{- fail (printf "kafka.replicationFactor %d: the bundled kafka.tansu is one broker (1 replica)" (int .Values.kafka.replicationFactor)) }}
{{- end }}
{{- if and (include "odpo.kafkaSasl" .) (or (not $sec.sasl.username) (not $sec.sasl.existingSecret)) }}
{{- fail (printf "kafka.security.protocol %s needs kafka.security.sasl.username and kafka.security.sasl.existingSecret (the password's Secret)" $sec.protocol) }}
{{- end }}
{{- if and (or $sec.tls.caSecret $sec.tls.clientCertSecret) (not (include "odpo.kafkaTls" .)) }}
{{- fail "kafka.security.tls.* needs kafka.security.protocol SSL or SASL_SSL" }}
{{- end }}
{{- end }}

{{/* The serving engines of the gateway and the gate: the vLLM you run (`generator.vllmUrl`), or every
generator pod's vLLM through the headless `-engines` Service (both resolve it to all addresses:
`vllm_resolve_dns`). */}}
{{- define "odpo.vllmUrl" -}}
{{- if .Values.generator.vllmUrl }}
{{- .Values.generator.vllmUrl }}
{{- else }}
{{- printf "http://%s-engines:%d" (include "odpo.componentName" (dict "root" . "component" "generator")) (int .Values.generator.vllmPort) }}
{{- end }}
{{- end }}

{{/* Fixed paths inside every pod. */}}
{{- define "odpo.configPath" -}}/etc/odpo/odpo.yaml{{- end }}
{{- define "odpo.cachePath" -}}/var/cache/odpo{{- end }}
{{- define "odpo.adminTokenDir" -}}/etc/odpo-admin{{- end }}
{{- define "odpo.vllmKeyDir" -}}/etc/odpo-vllm{{- end }}
{{- define "odpo.kafkaSecretsDir" -}}/etc/odpo-kafka{{- end }}

{{/* Pod-level fields every component shares: dict "root" $ "values" .Values.<component> */}}
{{- define "odpo.podCommon" -}}
{{- $root := .root -}}
serviceAccountName: {{ include "odpo.serviceAccountName" $root }}
automountServiceAccountToken: {{ $root.Values.serviceAccount.automountToken }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod metadata: dict "root" $ "component" "judge" */}}
{{- define "odpo.podMetadata" -}}
labels:
  {{- include "odpo.componentSelectorLabels" . | nindent 2 }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  # Roll the pods when the settings change.
  checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
  {{- with .root.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Container fields every odpo component shares: dict "root" $ "component" "judge" ("gpu" true: the GPU image) */}}
{{- define "odpo.containerCommon" -}}
image: {{ ternary (include "odpo.gpuImage" .root) (include "odpo.image" .root) (default false .gpu) }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
args: [{{ .component | quote }}]
command: ["odpo"]
securityContext:
  {{- toYaml .root.Values.securityContext | nindent 2 }}
env:
  - name: ODPO_CONFIG
    value: {{ include "odpo.configPath" . }}
  # Library caches (HF, torch, vLLM) go under HOME: keep it on a writable volume.
  - name: HOME
    value: /tmp
  - name: HF_HOME
    value: {{ include "odpo.cachePath" . }}/hf
  - name: HF_HUB_OFFLINE
    value: "1"
  - name: PYTHONUNBUFFERED
    value: "1"
  {{- with .root.Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Volume mounts every odpo container has (every one is a Kafka client: its Secrets too). */}}
{{- define "odpo.commonMounts" -}}
- name: config
  mountPath: /etc/odpo
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: {{ include "odpo.cachePath" . }}
{{- if include "odpo.kafkaSasl" . }}
- name: kafka-sasl
  mountPath: {{ include "odpo.kafkaSecretsDir" . }}/sasl
  readOnly: true
{{- end }}
{{- if and (include "odpo.kafkaTls" .) .Values.kafka.security.tls.caSecret }}
- name: kafka-ca
  mountPath: {{ include "odpo.kafkaSecretsDir" . }}/ca
  readOnly: true
{{- end }}
{{- if and (include "odpo.kafkaTls" .) .Values.kafka.security.tls.clientCertSecret }}
- name: kafka-client-cert
  mountPath: {{ include "odpo.kafkaSecretsDir" . }}/client
  readOnly: true
{{- end }}
{{- end }}

{{/* vLLM's API key as a file, in vLLM's clients only (generator, gateway, gate). */}}
{{- define "odpo.vllmKeyMount" -}}
{{- if .Values.vllm.apiKey.enabled }}
- name: vllm-api-key
  mountPath: {{ include "odpo.vllmKeyDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "odpo.vllmKeyVolume" -}}
{{- if .Values.vllm.apiKey.enabled }}
- name: vllm-api-key
  secret:
    secretName: {{ include "odpo.vllmKeySecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.vllm.apiKey.existingSecretKey }}
        path: api-key
{{- end }}
{{- end }}

{{/* Mounts of the trainer, which writes versions into the store (the generator mounts the store itself). */}}
{{- define "odpo.modelMounts" -}}
- name: adapters
  mountPath: {{ .Values.adapterStore.mountPath }}
{{- if .Values.baseModel.existingClaim }}
{{ include "odpo.baseModelMount" . }}
{{- end }}
{{- end }}

{{/* The base model's claim, read-only; only with baseModel.existingClaim (else the packaged model is converted
into the cache volume). */}}
{{- define "odpo.baseModelMount" -}}
- name: model
  mountPath: {{ .Values.baseModel.mountPath }}
  readOnly: true
{{- end }}

{{- define "odpo.baseModelVolume" -}}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.baseModel.existingClaim }}
    readOnly: true
{{- end }}

{{/* "true" when a boolean setting of a config.<component> section is on; absent means the settings' default, on.
Written as pydantic reads it: false, 0, no, off, f, n (any case) are off. dict "section" .Values.config.judge "key" "x" */}}
{{- define "odpo.settingOn" -}}
{{- $section := default dict .section }}
{{- if or (not (hasKey $section .key)) (not (has (lower (toString (get $section .key))) (list "false" "0" "no" "off" "f" "n"))) }}true{{ end }}
{{- end }}

{{/* "true" when the gate or the judge loads the base model to score the reference log-prob per token:
the promotion gate with `reference_logprob`, the judge's quality guard with `reference_logprob` (except
judge `human` and composition `rules_only`, which load no guard). Mirrors service/gate/promotion.py and
judge/service.py. The gateway never loads it. dict "root" $ "component" "judge" */}}
{{- define "odpo.loadsReferenceModel" -}}
{{- $config := .root.Values.config }}
{{- if eq .component "gate" }}
{{- include "odpo.settingOn" (dict "section" $config.gate "key" "reference_logprob") }}
{{- else if eq .component "judge" }}
{{- $judge := default dict $config.judge }}
{{- if and (ne (toString (default "verifier" $judge.judge)) "human") (ne (toString (default "product" $judge.composition)) "rules_only") }}
{{- include "odpo.settingOn" (dict "section" $judge "key" "reference_logprob") }}
{{- end }}
{{- end }}
{{- end }}

{{- define "odpo.commonVolumes" -}}
{{- $sec := .Values.kafka.security -}}
- name: config
  configMap:
    name: {{ include "odpo.fullname" . }}-config
- name: tmp
  emptyDir: {}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.cache.sizeLimit }}
{{- if include "odpo.kafkaSasl" . }}
- name: kafka-sasl
  secret:
    secretName: {{ $sec.sasl.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $sec.sasl.existingSecretKey }}
        path: password
{{- end }}
{{- if and (include "odpo.kafkaTls" .) $sec.tls.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ $sec.tls.caSecret }}
    defaultMode: 0444
    items:
      - key: {{ $sec.tls.caSecretKey }}
        path: ca.crt
{{- end }}
{{- if and (include "odpo.kafkaTls" .) $sec.tls.clientCertSecret }}
- name: kafka-client-cert
  secret:
    secretName: {{ $sec.tls.clientCertSecret }}
    defaultMode: 0440
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- end }}

{{- define "odpo.modelVolumes" -}}
- name: adapters
  persistentVolumeClaim:
    claimName: {{ include "odpo.adapterClaim" . }}
{{- if .Values.baseModel.existingClaim }}
{{ include "odpo.baseModelVolume" . }}
{{- end }}
{{- end }}

{{/* Resources with GPUs added: dict "resources" .Values.x.resources "gpu" .Values.x.gpu */}}
{{- define "odpo.resources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- if and .gpu .gpu.enabled }}
{{- $limits := default dict $res.limits }}
{{- $_ := set $limits .gpu.resourceName (int .gpu.count) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* An HTTP probe: dict "path" "/healthz" "port" "metrics" "timing" .Values.x.livenessProbe */}}
{{- define "odpo.httpProbe" -}}
httpGet:
  path: {{ .path }}
  port: {{ .port }}
{{ toYaml .timing }}
{{- end }}
