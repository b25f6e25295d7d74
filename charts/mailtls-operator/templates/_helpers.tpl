{{/* The chart name, overridable. */}}
{{- define "mailtls-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: the release name, plus the chart name unless
the release name already contains it. Kept short enough for "-mailtlspolicy-viewer".
*/}}
{{- define "mailtls-operator.fullname" -}}
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

{{- define "mailtls-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "mailtls-operator.labels" -}}
helm.sh/chart: {{ include "mailtls-operator.chart" . }}
{{ include "mailtls-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mailtls-operator
{{- end }}

{{/* Labels that select the operator pod; never change them (Deployment selectors are immutable). */}}
{{- define "mailtls-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailtls-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "mailtls-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mailtls-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mailtls-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The Lease the replicas elect their leader on (leaderElection.enabled), in the release
namespace: one per release, so two releases in one namespace never pause each other.
*/}}
{{- define "mailtls-operator.leaseName" -}}
{{- include "mailtls-operator.fullname" . }}
{{- end }}

{{/* The Deployment's update strategy: updateStrategy.type, else derived from leader election. */}}
{{- define "mailtls-operator.updateStrategy" -}}
{{- $type := .Values.updateStrategy.type | default (ternary "RollingUpdate" "Recreate" .Values.leaderElection.enabled) }}
{{- if and (eq $type "RollingUpdate") (not .Values.leaderElection.enabled) }}
{{- fail "updateStrategy.type RollingUpdate needs leaderElection.enabled: without it the old and the new operator would both act during an upgrade" }}
{{- end -}}
type: {{ $type }}
{{- if eq $type "RollingUpdate" }}
rollingUpdate:
  # The new pod starts as a standby before an old one stops; the Lease moves when the
  # old leader releases it on shutdown.
  maxSurge: 1
  maxUnavailable: 0
{{- end }}
{{- end }}

{{/* True (non-empty) when the operator watches every namespace. */}}
{{- define "mailtls-operator.clusterwide" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
The `mailtls run` arguments, one per line as a YAML list. The kustomize base runs the
same list (tests/contract checks it).
*/}}
{{- define "mailtls-operator.args" -}}
- run
{{- if .Values.watchNamespaces }}
{{- range .Values.watchNamespaces }}
- --namespace={{ . }}
{{- end }}
{{- else }}
- --all-namespaces
{{- end }}
{{- if .Values.leaderElection.enabled }}
- --leader-elect
- --lease-namespace=$(POD_NAMESPACE)
- --lease-name={{ include "mailtls-operator.leaseName" . }}
{{- end }}
- --health=0.0.0.0:{{ .Values.health.port }}
{{- if .Values.metrics.enabled }}
- --metrics=0.0.0.0:{{ .Values.metrics.port }}
{{- else }}
- --metrics=off
{{- end }}
- --strategy={{ .Values.strategy }}
- --debounce={{ .Values.rollout.debounce }}
- --max-delay={{ .Values.rollout.maxDelay }}
- --parallelism={{ .Values.rollout.parallelism }}
- --max-exception-days={{ .Values.maxExceptionDays }}
- --probe-interval={{ .Values.probeInterval }}
{{- if .Values.verbose }}
- --verbose
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
agent.tlsrpt: the directory of the TLSRPT socket (the volume the Postfix container and the
agent share), after checking the socket name as the agent does (agent/tlsrpt.py): below
the queue directory, never under private/ or public/, no "..", in a directory of its own.
*/}}
{{- define "mailtls-operator.tlsrptSocketDir" -}}
{{- $t := .Values.agent.tlsrpt -}}
{{- if ne .Values.strategy "agent" -}}
{{- fail "agent.tlsrpt.enabled needs strategy: agent (the agent sidecar receives Postfix's TLSRPT datagrams)" -}}
{{- end -}}
{{- $parts := list -}}
{{- range splitList "/" $t.socketName -}}
{{- if and . (ne . ".") -}}{{- $parts = append $parts . -}}{{- end -}}
{{- end -}}
{{- if has ".." $parts -}}
{{- fail (printf "agent.tlsrpt.socketName %q leaves the queue directory" $t.socketName) -}}
{{- end -}}
{{- if and $parts (has (first $parts) (list "private" "public")) -}}
{{- fail (printf "agent.tlsrpt.socketName %q is under %s/, which Postfix reserves for its own services" $t.socketName (first $parts)) -}}
{{- end -}}
{{- if lt (len $parts) 2 -}}
{{- fail (printf "agent.tlsrpt.socketName %q: name a directory below the queue directory for the socket (e.g. tlsrpt/sock): that directory is the volume both containers share" $t.socketName) -}}
{{- end -}}
{{- printf "%s/%s" (trimSuffix "/" $t.queueDirectory) (join "/" (initial $parts)) -}}
{{- end -}}
