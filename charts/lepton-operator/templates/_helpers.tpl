{{/*
Names and labels, in one place so every object agrees on them.
*/}}

{{- define "lepton-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: `<release>-<chart>`, or the release name if it already holds the chart name. */}}
{{- define "lepton-operator.fullname" -}}
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

{{- define "lepton-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of the chart's own objects. `app.kubernetes.io/managed-by` is Helm here; the
trainer pods the operator creates carry `managed-by: lepton-operator` instead, which is
what the PodMonitor selects, so the two never mix.
*/}}
{{- define "lepton-operator.labels" -}}
helm.sh/chart: {{ include "lepton-operator.chart" . }}
{{ include "lepton-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "lepton-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lepton-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "lepton-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lepton-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lepton-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
RBAC rules the operator needs inside every namespace it manages. The single source for
both modes: a ClusterRole (all namespaces) or one Role per watched namespace. Least
privilege: no secrets, no configmaps, no wildcards, no nodes.
*/}}
{{- define "lepton-operator.namespacedRules" -}}
# Worker pods: created and deleted per generation; patched by kopf (annotations) and for
# adoption checks; watched to follow their phase and exit codes.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
# The headless Service that gives workers their rendezvous DNS names.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "delete"]
# Each job's PodDisruptionBudget (minAvailable = its world size, so a drain waits for the
# operator's checkpoint-aware move; deleted by garbage collection via ownerRefs).
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The checkpoint claim a job may ask for (deleted by garbage collection via ownerRefs).
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create"]
# Events about jobs (kopf posts core/v1 events; newer clients use events.k8s.io).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# The jobs themselves: kopf patches finalizers and its progress annotations; delete is for
# ttlSecondsAfterFinished.
- apiGroups: ["lepton.ai"]
  resources: ["leptonjobs"]
  verbs: ["get", "list", "watch", "patch", "update", "delete"]
# Subresources only support get/patch/update; list and watch on them would grant nothing.
- apiGroups: ["lepton.ai"]
  resources: ["leptonjobs/status", "leptonjobs/scale"]
  verbs: ["get", "patch", "update"]
{{- end }}

{{/* Cluster-scoped reads in both modes: kopf watches CRDs to notice its resource; the
operator lists nodes (read-only) to see lost and cordoned nodes under its workers. */}}
{{- define "lepton-operator.crdRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list"]
{{- end }}
