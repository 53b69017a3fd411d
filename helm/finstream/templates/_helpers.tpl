{{/* Names ------------------------------------------------------------------ */}}

{{- define "finstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finstream.fullname" -}}
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

{{/* "<fullname>-<suffix>", within the 63 characters of a DNS label. */}}
{{- define "finstream.componentName" -}}
{{- printf "%s-%s" (include "finstream.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finstream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels ----------------------------------------------------------------- */}}

{{- define "finstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "finstream.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "finstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finstream
{{- end }}

{{/* dict "root" $ "component" "quotes" */}}
{{- define "finstream.componentSelectorLabels" -}}
{{ include "finstream.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "finstream.componentLabels" -}}
{{ include "finstream.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Image ------------------------------------------------------------------ */}}

{{- define "finstream.image" -}}
{{- $i := .Values.image }}
{{- if $i.digest }}
{{- printf "%s@%s" $i.repository $i.digest }}
{{- else }}
{{- printf "%s:%s" $i.repository (default .Chart.AppVersion $i.tag) }}
{{- end }}
{{- end }}

{{/* Environment ------------------------------------------------------------
dict "root" $ "extra" <map of FINSTREAM_* for this component> "secrets" <its own secrets>
Plain settings first (sorted, so that a re-render never reorders them and
rolls pods for nothing), then the Secret references: secrets.env (what every
pod needs) and the component's own (workers.<role>.secrets, migrations.secrets,
database.*.secrets), so that a pod holds only the credentials of its role. */}}
{{- define "finstream.env" -}}
{{- $root := .root }}
{{- $c := $root.Values.config }}
{{- $env := dict
  "FINSTREAM_ENV" $c.env
  "FINSTREAM_NAMESPACE" $c.namespace
  "FINSTREAM_LOG_LEVEL" $c.logLevel
  "FINSTREAM_LOG_FORMAT" $c.logFormat
  "FINSTREAM_KAFKA_BOOTSTRAP" $c.kafkaBootstrap
  "FINSTREAM_INTERNAL_TOPIC_REPLICATION" (toString $c.internalTopicReplication)
  "FINSTREAM_HTTP_HOST" "0.0.0.0"
  "FINSTREAM_HTTP_PORT" (toString $root.Values.workerPort)
  "FINSTREAM_API_HOST" "0.0.0.0"
  "FINSTREAM_STACK_DIR" "/var/lib/finstream/stack"
}}
{{- if $c.schemaRegistryUrl }}
{{- $_ := set $env "FINSTREAM_SCHEMA_REGISTRY_URL" $c.schemaRegistryUrl }}
{{- end }}
{{- if $root.Values.templates.files }}
{{- $_ := set $env "FINSTREAM_TEMPLATES_DIR" $root.Values.templates.mountPath }}
{{- end }}
{{- $env = mergeOverwrite $env (deepCopy $c.extraEnv) (deepCopy (.extra | default dict)) }}
{{- $secrets := mergeOverwrite (deepCopy $root.Values.secrets.env) (deepCopy (.secrets | default dict)) }}
{{- range $name := keys $env | sortAlpha }}
{{- if hasKey $secrets $name }}
{{- fail (printf "%s is set both as a plain value and from a Secret (secrets.env); keep the Secret" $name) }}
{{- end }}
- name: {{ $name }}
  value: {{ index $env $name | toString | quote }}
{{- end }}
{{- /* A replica's transactional id: a restarted container fences its predecessor at once. */}}
- name: FINSTREAM_INSTANCE_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- range $name := keys $secrets | sortAlpha }}
{{- $ref := index $secrets $name }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name | default $root.Values.secrets.name }}
      key: {{ $ref.key }}
      {{- if $ref.optional }}
      optional: true
      {{- end }}
{{- end }}
{{- end }}

{{/* Pod pieces ------------------------------------------------------------- */}}

{{/* Pod-level fields every finstream pod shares. */}}
{{- define "finstream.podCommon" -}}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
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
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* dict "root" $ "component" "quotes" */}}
{{- define "finstream.topologySpread" -}}
{{- $t := .root.Values.topologySpread }}
{{- if $t.enabled }}
topologySpreadConstraints:
  {{- range $key := list "topology.kubernetes.io/zone" "kubernetes.io/hostname" }}
  - maxSkew: {{ $t.maxSkew }}
    topologyKey: {{ $key }}
    whenUnsatisfiable: {{ $t.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "finstream.componentSelectorLabels" $ | nindent 8 }}
  {{- end }}
{{- end }}
{{- end }}

{{/* Writable /tmp and state dir on a read-only root filesystem. */}}
{{- define "finstream.volumes" -}}
volumes:
  - name: tmp
    emptyDir:
      sizeLimit: {{ .Values.volumes.tmpSizeLimit }}
  - name: state
    emptyDir:
      sizeLimit: {{ .Values.volumes.stateSizeLimit }}
  {{- range $i, $m := .Values.secrets.mounts }}
  - name: secret-{{ $i }}
    secret:
      secretName: {{ $m.secret }}
      defaultMode: 0440
  {{- end }}
  {{- if .Values.templates.files }}
  # ConfigMap keys cannot hold "/": each file's key is its path with "__", and
  # items put it back in its folder (no subPath, so updates reach the pod).
  - name: templates
    configMap:
      name: {{ include "finstream.fullname" . }}-templates
      items:
        {{- range $path := keys .Values.templates.files | sortAlpha }}
        - key: {{ replace "/" "__" $path | quote }}
          path: {{ $path | quote }}
        {{- end }}
  {{- end }}
{{- end }}

{{- define "finstream.volumeMounts" -}}
volumeMounts:
  - name: tmp
    mountPath: /tmp
  - name: state
    mountPath: /var/lib/finstream
  {{- range $i, $m := .Values.secrets.mounts }}
  - name: secret-{{ $i }}
    mountPath: {{ $m.mountPath }}
    readOnly: true
  {{- end }}
  {{- if .Values.templates.files }}
  - name: templates
    mountPath: {{ .Values.templates.mountPath }}
    readOnly: true
  {{- end }}
{{- end }}

{{/* Autoscaling -------------------------------------------------------------- */}}

{{/* "keda" or "hpa": the engine in force when autoscaling is on. */}}
{{- define "finstream.engine" -}}
{{- $engine := .Values.autoscaling.engine }}
{{- if eq $engine "auto" }}
{{- if .Capabilities.APIVersions.Has "keda.sh/v1alpha1/ScaledObject" }}keda{{ else }}hpa{{ end }}
{{- else }}
{{- $engine }}
{{- end }}
{{- end }}

{{/* Partition count per topic, from the catalogue (files/topics.yaml). */}}
{{- define "finstream.partitions" -}}
{{- $catalogue := .Files.Get "files/topics.yaml" | fromYaml }}
{{- if not $catalogue.topics }}
{{- fail "files/topics.yaml (a link to the repository's topics.yaml) is missing or has no topics" }}
{{- end }}
{{- $parts := dict }}
{{- range $catalogue.topics }}
{{- $_ := set $parts .name (int .partitions) }}
{{- end }}
{{- toJson $parts }}
{{- end }}

{{/*
dict "root" $ "name" <role> "worker" <values>: the role's scaling as JSON:
{"mode": "lag"|"cpu"|"singleton", "engine": "keda"|"hpa"|"", "min": n, "max": n,
"cap": n}. For lag scaling the cap is the smallest partition count among the
role's inputs: with more replicas than partitions of an input, a replica
would hold none of that topic (Kafka gives each partition to one consumer).
*/}}
{{- define "finstream.workerScaling" -}}
{{- $root := .root }}
{{- $w := .worker }}
{{- $a := $w.autoscaling | default dict }}
{{- $parts := include "finstream.partitions" $root | fromJson }}
{{- $cap := 0 }}
{{- range $w.inputs }}
{{- if not (hasKey $parts .) }}
{{- fail (printf "workers.%s reads %q, which topics.yaml does not list" $.name .) }}
{{- end }}
{{- $p := int (index $parts .) }}
{{- if or (eq $cap 0) (lt $p $cap) }}{{ $cap = $p }}{{ end }}
{{- end }}
{{- if and (eq $w.scaling "lag") (not $w.inputs) }}
{{- fail (printf "workers.%s reads no topic, so it cannot scale on lag: use scaling cpu or singleton" .name) }}
{{- end }}
{{- if and (eq $w.scaling "singleton") $a.enabled }}
{{- fail (printf "workers.%s is a singleton (one replica, never two at once): set workers.%s.autoscaling.enabled=false" .name .name) }}
{{- end }}
{{- $engine := "" }}
{{- if and $root.Values.autoscaling.enabled $a.enabled }}
{{- $engine = include "finstream.engine" $root }}
{{- end }}
{{- $max := 1 }}
{{- if eq $w.scaling "lag" }}
{{- $max = $cap }}
{{- if and $a.maxReplicas (lt (int $a.maxReplicas) $cap) }}{{ $max = int $a.maxReplicas }}{{ end }}
{{- else if eq $w.scaling "cpu" }}
{{- $max = int (required (printf "workers.%s.autoscaling.maxReplicas is required for cpu scaling" .name) $a.maxReplicas) }}
{{- end }}
{{- $min := int ($a.minReplicas | default 1) }}
{{- if gt $min $max }}{{ $min = $max }}{{ end }}
{{- dict "mode" $w.scaling "engine" $engine "min" $min "max" $max "cap" $cap | toJson }}
{{- end }}

{{/* dict "root" $ "min" n "max" n: HPA behavior (also KEDA's advanced.horizontalPodAutoscalerConfig). */}}
{{- define "finstream.scalingBehavior" -}}
{{- $a := .root.Values.autoscaling }}
scaleDown:
  stabilizationWindowSeconds: {{ $a.scaleDownStabilizationSeconds }}
  policies:
    - type: Pods
      value: {{ $a.scaleDownPodsPerPeriod }}
      periodSeconds: {{ $a.scaleDownPeriodSeconds }}
scaleUp:
  stabilizationWindowSeconds: {{ $a.scaleUpStabilizationSeconds }}
  policies:
    - type: Pods
      value: {{ $a.scaleUpPodsPerMinute }}
      periodSeconds: 60
{{- end }}

{{/* Optional operator APIs: "true", "false" or "auto" (auto = the cluster serves it). */}}
{{- define "finstream.apiWanted" -}}
{{- $setting := toString .setting }}
{{- if eq $setting "true" }}true
{{- else if and (eq $setting "auto") (.root.Capabilities.APIVersions.Has .api) }}true
{{- end }}
{{- end }}
