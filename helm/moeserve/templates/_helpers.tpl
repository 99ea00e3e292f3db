{{/* The chart's name. */}}
{{- define "moeserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name, which names the RayService: at most 47 characters, because KubeRay derives longer names
(cluster, pods, services) from it and refuses a RayService whose name is longer.
*/}}
{{- define "moeserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "moeserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "moeserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moeserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "moeserve.labels" -}}
helm.sh/chart: {{ include "moeserve.chart" . }}
{{ include "moeserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "moeserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "moeserve.configName" -}}
{{- printf "%s-cluster" (include "moeserve.fullname" .) }}
{{- end }}

{{/* Where the cluster YAML is mounted in every pod. */}}
{{- define "moeserve.configPath" -}}/etc/moeserve/cluster.yaml{{- end }}

{{/* The cluster YAML: the values' ClusterConfig with the keys the chart owns. */}}
{{- define "moeserve.clusterYaml" -}}
{{- $owned := dict "model" .Values.model.path "placement" "resources" "ray" (merge (dict "address" "auto") (default (dict) .Values.cluster.ray)) }}
{{- /* each pool on the pods' GPUs, a pod's GPUs split over the actors it hosts; cluster.devices overrides */}}
{{- $devices := dict "attention" "cpu" "experts" "cpu" }}
{{- if gt (int .Values.attention.gpus) 0 }}
{{- $_ := set $devices "attention" "cuda" }}
{{- $_ := set $devices "attention_gpus" (divf .Values.attention.gpus .Values.attention.shardsPerPod) }}
{{- end }}
{{- if gt (int .Values.experts.gpus) 0 }}
{{- $_ := set $devices "experts" "cuda" }}
{{- $_ := set $devices "expert_gpus" (divf .Values.experts.gpus .Values.experts.groupsPerPod) }}
{{- end }}
{{- $_ := set $owned "devices" (merge (default (dict) .Values.cluster.devices) $devices) }}
{{- toYaml (merge $owned (omit .Values.cluster "model" "placement" "ray" "devices")) }}
{{- end }}

{{/* Volumes every Ray pod mounts: the model and the cluster YAML. */}}
{{- define "moeserve.volumes" -}}
- name: model
{{- if eq .Values.model.volume.kind "hostPath" }}
  hostPath:
    path: {{ .Values.model.volume.hostPath }}
    type: Directory
{{- else }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.volume.claimName }}
{{- end }}
- name: cluster-config
  configMap:
    name: {{ include "moeserve.configName" . }}
{{- if .Values.model.copyFrom.path }}
- name: model-source
{{- toYaml .Values.model.copyFrom.volume | nindent 2 }}
{{- end }}
{{- end }}

{{- define "moeserve.volumeMounts" -}}
- name: model
  mountPath: {{ .Values.model.volume.mountPath }}
  readOnly: {{ and .Values.model.volume.readOnly (not .Values.model.copyFrom.path) }}
- name: cluster-config
  mountPath: /etc/moeserve
  readOnly: true
{{- end }}

{{/* The init container that copies the checkpoint from `model.copyFrom` (skipped when it is already there). */}}
{{- define "moeserve.initContainers" -}}
{{- if .Values.model.copyFrom.path }}
initContainers:
  - name: copy-model
    image: {{ include "moeserve.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["sh", "-c"]
    args:
      - test -f {{ .Values.model.path | quote }}/config.json || (mkdir -p {{ .Values.model.path | quote }} && cp -a {{ printf "/model-source/%s/." (trimPrefix "/" .Values.model.copyFrom.path) | quote }} {{ .Values.model.path | quote }})
    volumeMounts:
      - name: model
        mountPath: {{ .Values.model.volume.mountPath }}
      - name: model-source
        mountPath: /model-source
        readOnly: true
{{- end }}
{{- end }}

{{/* Environment of every Ray container (KubeRay adds Ray's token when auth is on). */}}
{{- define "moeserve.env" -}}
- name: MOESERVE_CONFIG
  value: {{ include "moeserve.configPath" . }}
{{- end }}

{{/* A worker container's resources with its GPUs. */}}
{{- define "moeserve.gpuResources" -}}
{{- $r := deepCopy .resources }}
{{- if gt (int .gpus) 0 }}
{{- $_ := set $r "limits" (merge (dict "nvidia.com/gpu" (toString .gpus)) (default (dict) $r.limits)) }}
{{- $_ := set $r "requests" (merge (dict "nvidia.com/gpu" (toString .gpus)) (default (dict) $r.requests)) }}
{{- end }}
{{- toYaml $r }}
{{- end }}
