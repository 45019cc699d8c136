{{- define "specray.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "specray.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "specray.labels" -}}
{{ include "specray.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "specray.image" -}}
{{- $repository := required "image.repository is required: the registry path you pushed the specray image to (docs/deploy.md, step 1)" .Values.image.repository -}}
{{ $repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "specray.redisSecretName" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis" (include "specray.fullname" .)) -}}
{{- end -}}

{{- define "specray.apiKeySecretName" -}}
{{- .Values.apiKey.existingSecret | default (printf "%s-api-key" (include "specray.fullname" .)) -}}
{{- end -}}

{{/* The Redis URL the application gets; the password stays a $VAR the pods expand (see session_store). */}}
{{- define "specray.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- $auth := ternary ":${SPECRAY_REDIS_PASSWORD}@" "" .Values.redis.auth.enabled -}}
{{- printf "redis://%s%s-redis.%s.svc:6379/0" $auth (include "specray.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- required "redis.external.url is required when redis.enabled is false" .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{/* The Serve config: cluster/app/serve_config.py's serve_config() of the specray values. */}}
{{- define "specray.serveConfig" -}}
{{- $args := merge (dict "host" "0.0.0.0" "redis_url" (include "specray.redisUrl" .)) (deepCopy .Values.specray) -}}
{{- $app := dict "name" "specray" "route_prefix" "/" "import_path" "specray.cluster.app.application:app_builder" "args" $args -}}
{{- toYaml (dict "proxy_location" "HeadOnly" "http_options" (dict "host" "0.0.0.0" "port" .Values.specray.http_port) "applications" (list $app)) -}}
{{- end -}}

{{/* Ray custom resources as `ray start --resources` takes them (a quoted JSON object). */}}
{{- define "specray.rayResources" -}}
{{- printf "%q" (toJson .) | squote -}}
{{- end -}}

{{/* A Ray pod template; args: root (the chart context), group (its values), component, head (bool). */}}
{{- define "specray.podTemplate" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
metadata:
  labels:
    {{- include "specray.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
  {{- with $v.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" .head }}
      image: {{ include "specray.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- if .head }}
      ports:
        - {name: gcs, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        - {name: http, containerPort: {{ $v.specray.http_port }}}
        - {name: grpc, containerPort: {{ $v.specray.grpc_port }}}
      {{- end }}
      env:
        # The first start converts the model into this cache.
        - {name: SPECRAY_CACHE_DIR, value: /cache}
        {{- if and $v.redis.enabled $v.redis.auth.enabled }}
        - name: SPECRAY_REDIS_PASSWORD
          valueFrom:
            secretKeyRef: {name: {{ include "specray.redisSecretName" $root }}, key: {{ $v.redis.auth.existingSecretKey }}}
        {{- else if and (not $v.redis.enabled) $v.redis.external.passwordSecret.name }}
        - name: SPECRAY_REDIS_PASSWORD
          valueFrom:
            secretKeyRef: {name: {{ $v.redis.external.passwordSecret.name }}, key: {{ $v.redis.external.passwordSecret.key }}}
        {{- end }}
        {{- if or $v.apiKey.existingSecret $v.apiKey.value }}
        - name: SPECRAY_API_KEY
          valueFrom:
            secretKeyRef: {name: {{ include "specray.apiKeySecretName" $root }}, key: {{ $v.apiKey.existingSecretKey }}}
        {{- end }}
        {{- with $v.telemetry.otel }}
        {{- if .endpoint }}
        - {name: OTEL_SERVICE_NAME, value: {{ .serviceName | quote }}}
        - {name: OTEL_EXPORTER_OTLP_ENDPOINT, value: {{ .endpoint | quote }}}
        - {name: OTEL_EXPORTER_OTLP_PROTOCOL, value: {{ .protocol | quote }}}
        {{- $attrs := list (printf "k8s.namespace.name=%s" $root.Release.Namespace) "k8s.pod.name=$(SPECRAY_POD_NAME)" (printf "specray.component=%s" $.component) -}}
        {{- range $k, $val := .resourceAttributes }}
        {{- $attrs = append $attrs (printf "%s=%s" $k $val) }}
        {{- end }}
        - name: SPECRAY_POD_NAME
          valueFrom:
            fieldRef: {fieldPath: metadata.name}
        - {name: OTEL_RESOURCE_ATTRIBUTES, value: {{ join "," $attrs | quote }}}
        {{- end }}
        {{- end }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .group.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      lifecycle:
        preStop:
          exec: {command: ["/bin/sh", "-c", "ray stop"]}
      volumeMounts:
        - {name: cache, mountPath: /cache}
        - {name: dshm, mountPath: /dev/shm}
        {{- if eq $v.models.source "pvc" }}
        - {name: models, mountPath: {{ $v.models.mountPath }}, readOnly: true}
        {{- end }}
  volumes:
    - name: cache
      emptyDir: {}
    # Ray's object store lives in shared memory; the container default (64 MiB) is too small.
    - name: dshm
      emptyDir: {medium: Memory}
    {{- if eq $v.models.source "pvc" }}
    - name: models
      persistentVolumeClaim:
        claimName: {{ required "models.pvc.claimName is required when models.source is pvc" $v.models.pvc.claimName }}
        readOnly: true
    {{- end }}
{{- end -}}

{{/* A worker group; args: root, name, group. */}}
{{- define "specray.workerGroup" -}}
{{- if gt (int .group.minReplicas) (int .group.maxReplicas) -}}
{{- fail (printf "%s.minReplicas (%v) must be <= %s.maxReplicas (%v)" .name .group.minReplicas .name .group.maxReplicas) -}}
{{- end -}}
- groupName: {{ .name }}
  replicas: {{ .group.replicas }}
  minReplicas: {{ .group.minReplicas }}
  maxReplicas: {{ .group.maxReplicas }}
  rayStartParams:
    resources: {{ include "specray.rayResources" .group.rayResources }}
  template:
    {{- include "specray.podTemplate" (dict "root" .root "group" .group "component" .name "head" false) | nindent 4 }}
{{- end -}}
