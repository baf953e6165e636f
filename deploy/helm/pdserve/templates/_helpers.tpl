{{- define "pdserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 50 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "pdserve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pdserve.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "pdserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "pdserve.redisUrl" -}}
{{- if .Values.redis.externalUrl -}}{{ .Values.redis.externalUrl }}{{- else if .Values.redis.enabled -}}redis://{{ include "pdserve.fullname" . }}-redis:6379/0{{- end -}}
{{- end -}}

{{- define "pdserve.tokenSecretName" -}}
{{- .Values.cluster.internalTokenSecret.name | default (printf "%s-internal-token" (include "pdserve.fullname" .)) -}}
{{- end -}}

{{- define "pdserve.adminTokenSecretName" -}}
{{- .Values.router.adminTokenSecret.name | default (printf "%s-admin-token" (include "pdserve.fullname" .)) -}}
{{- end -}}

{{- define "pdserve.gpusPerWorker" -}}
{{- mul .pool.tpSize .pool.epSize -}}
{{- end -}}

{{/* A worker spans nodes when its ranks need more GPUs than a node has. */}}
{{- define "pdserve.multiNode" -}}
{{- if gt (mul .pool.tpSize .pool.epSize | int) (.pool.gpusPerNode | int) -}}true{{- end -}}
{{- end -}}

{{- define "pdserve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "pdserve.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "pdserve.modelVolume" -}}
- name: model
{{- if eq .Values.model.source.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.source.pvc.claimName }}
    readOnly: {{ .Values.model.source.pvc.readOnly }}
{{- else if eq .Values.model.source.type "hostPath" }}
  hostPath:
    path: {{ .Values.model.source.hostPath.path }}
    type: Directory
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}

{{/* The worker container, shared by the StatefulSets and the KubeRay head groups. */}}
{{- define "pdserve.workerContainer" -}}
{{- $root := .root -}}
{{- $pool := .pool -}}
{{- $model := .model | default $root.Values.model -}}
{{- $gpus := include "pdserve.gpusPerWorker" . | int -}}
{{- $local := ternary $gpus (int $pool.gpusPerNode) (le $gpus (int $pool.gpusPerNode)) -}}
{{- /* Under KubeRay the operator starts Ray in the head pod; a StatefulSet pod starts its own head. */ -}}
{{- $rayStart := and (gt $gpus 1) (not .kuberay) -}}
name: worker
image: {{ include "pdserve.image" $root }}
imagePullPolicy: {{ $root.Values.image.pullPolicy }}
command: ["/bin/sh", "-c"]
args:
  - {{- if $rayStart }}
    ray start --head --num-gpus={{ $local }} --disable-usage-stats && exec python -m worker.serve
    {{- else }}
    exec python -m worker.serve
    {{- end }}
env:
  - {name: PDSERVE_ROLE, value: {{ .component | quote }}}
  - name: PDSERVE_NAME
    valueFrom: {fieldRef: {fieldPath: metadata.name}}
  - {name: PDSERVE_MODEL, value: {{ $model.path | quote }}}
  {{- with $model.servedModelName }}
  - {name: PDSERVE_SERVED_MODEL_NAME, value: {{ . | quote }}}
  {{- end }}
  - {name: PDSERVE_QUANTIZATION, value: {{ $model.quantization | default "auto" | quote }}}
  - {name: PDSERVE_HOST, value: "0.0.0.0"}
  - {name: PDSERVE_PORT, value: {{ $pool.port | quote }}}
  - {name: PDSERVE_BLOCK_SIZE, value: {{ $root.Values.cluster.blockSize | quote }}}
  - {name: PDSERVE_TRANSPORT, value: {{ $root.Values.cluster.transport | quote }}}
  - {name: PDSERVE_KV_CACHE_DTYPE, value: {{ $root.Values.cluster.kvCacheDtype | default "auto" | quote }}}
  - {name: PDSERVE_MAX_NUM_SEQS, value: {{ $pool.maxNumSeqs | quote }}}
  - {name: PDSERVE_MAX_NUM_BATCHED_TOKENS, value: {{ $pool.maxNumBatchedTokens | quote }}}
  - {name: PDSERVE_GPU_MEMORY_UTILIZATION, value: {{ $pool.gpuMemoryUtilization | quote }}}
  - {name: PDSERVE_KV_HOST_BYTES, value: {{ $pool.kvHostBytes | default 0 | int64 | quote }}}
  {{- if $pool.kvDiskBytes }}
  - {name: PDSERVE_KV_DISK_BYTES, value: {{ $pool.kvDiskBytes | int64 | quote }}}
  - {name: PDSERVE_KV_DISK_DIR, value: "/home/pdserve/.cache/pdserve-kv/$(PDSERVE_NAME)"}  # a restart reuses it
  {{- end }}
  {{- with (and (not .model) $root.Values.lora) }}{{/* (the first model's adapters) */}}
  {{- if and .adapters (not .maxLoras) }}
  {{- fail "lora.adapters needs lora.maxLoras > 0 (how many adapters may run in one batch)" }}
  {{- end }}
  {{- if .maxLoras }}
  - {name: PDSERVE_MAX_LORAS, value: {{ .maxLoras | quote }}}
  - {name: PDSERVE_MAX_LORA_RANK, value: {{ .maxRank | quote }}}
  - {name: PDSERVE_MAX_CPU_LORAS, value: {{ .maxCpuLoras | quote }}}
  {{- $adapters := list }}
  {{- range .adapters }}{{ $adapters = append $adapters (printf "%s=%s" .name .path) }}{{ end }}
  {{- with $adapters }}
  - {name: PDSERVE_LORA, value: {{ join "," . | quote }}}  # NAME=PATH, comma-separated (--lora)
  {{- end }}
  {{- end }}
  {{- end }}
  - {name: PDSERVE_TP_SIZE, value: {{ $pool.tpSize | quote }}}
  - {name: PDSERVE_EP_SIZE, value: {{ $pool.epSize | quote }}}
  {{- if gt $gpus 1 }}
  - {name: PDSERVE_RAY_ADDRESS, value: "auto"}  # the ranks join the Ray head started above (or KubeRay's)
  {{- end }}
  - {name: PDSERVE_DRAIN_TIMEOUT_S, value: {{ $pool.drainTimeoutS | quote }}}
  - {name: PDSERVE_LOG_LEVEL, value: {{ $pool.logLevel | quote }}}
  {{- with $root.Values.tracing.otlpEndpoint }}
  - {name: PDSERVE_OTLP_ENDPOINT, value: {{ . | quote }}}
  - {name: PDSERVE_TRACE_RATIO, value: {{ $root.Values.tracing.ratio | toString | quote }}}
  {{- end }}
  - name: PDSERVE_INTERNAL_TOKEN
    valueFrom: {secretKeyRef: {name: {{ include "pdserve.tokenSecretName" $root }}, key: {{ $root.Values.cluster.internalTokenSecret.key }}}}
  - {name: UCX_TLS, value: {{ $pool.rdma.ucxTls | quote }}}
  {{- with $pool.rdma.ucxNetDevices }}
  - {name: UCX_NET_DEVICES, value: {{ . | quote }}}
  {{- end }}
  - {name: NCCL_NVLS_ENABLE, value: "0"}
  - {name: RAY_USAGE_STATS_ENABLED, value: "0"}
ports:
  - {name: http, containerPort: {{ $pool.port }}}
startupProbe:
  httpGet: {path: /health, port: http}
  periodSeconds: 10
  failureThreshold: 90
readinessProbe:
  httpGet: {path: /ready, port: http}
  periodSeconds: 5
livenessProbe:
  httpGet: {path: /health, port: http}
  periodSeconds: 15
  failureThreshold: 4
lifecycle:
  preStop:
    # Routers drop a terminating pod from their pool at once; this pause lets them notice before the
    # server stops taking connections, then SIGTERM drains in-flight requests (drainTimeoutS).
    exec: {command: ["/bin/sh", "-c", "sleep 5"]}
resources:
  {{- $res := deepCopy $pool.resources }}
  {{- $limits := merge (dict "nvidia.com/gpu" $local) ($res.limits | default dict) }}
  {{- if $pool.rdma.enabled }}{{- $_ := set $limits $pool.rdma.resourceName 1 }}{{- end }}
  {{- $_ := set $res "limits" $limits }}
  {{- toYaml $res | nindent 2 }}
securityContext:
  {{- include "pdserve.containerSecurityContext" . | nindent 2 }}
  {{- if $pool.rdma.enabled }}
  capabilities:
    drop: ["ALL"]
    add: ["IPC_LOCK"]
  {{- end }}
volumeMounts:
  - {name: model, mountPath: {{ dir $root.Values.model.path }}, readOnly: true}
  - {name: dshm, mountPath: /dev/shm}
  - {name: cache, mountPath: /home/pdserve/.cache}
{{- end -}}

{{- define "pdserve.workerVolumes" -}}
{{ include "pdserve.modelVolume" .root }}
- name: dshm
  emptyDir: {medium: Memory, sizeLimit: {{ .pool.shmSize }}}
- name: cache
{{- if .root.Values.workerCache.claimName }}
  persistentVolumeClaim: {claimName: {{ .root.Values.workerCache.claimName }}}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}

{{- define "pdserve.modelInit" -}}
{{- if eq .Values.model.source.type "image" }}
initContainers:
  - name: copy-model
    image: {{ .Values.model.source.image.repository }}:{{ .Values.model.source.image.tag }}
    command: ["/bin/sh", "-c", "cp -r {{ .Values.model.source.image.copyFrom }}/. {{ dir .Values.model.path }}/"]
    securityContext:
      {{- include "pdserve.containerSecurityContext" . | nindent 6 }}
    volumeMounts:
      - {name: model, mountPath: {{ dir .Values.model.path }}}
{{- end }}
{{- end -}}
