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
RBAC rules the operator needs inside every namespace it manages: exactly the verbs its
code calls (reconcile/kube.py is its only API caller besides kopf), nothing more. The
single source for both modes: a ClusterRole (all namespaces) or one Role per watched
namespace. No secrets, no configmaps, no wildcards, no node writes.
`get` on a child kind is for one case only: a create answered 409 reads the object that
holds the name to tell our own (created by an earlier pass) from a foreign one
(NameTaken).
*/}}
{{- define "lepton-operator.namespacedRules" -}}
# Worker pods: created and deleted (by uid) per generation; kopf indexes and watches them
# (list, watch), and the operator re-lists a job's pods now and then (list). Never
# patched: kopf writes nothing to objects it only indexes.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
# The headless Service that gives workers their rendezvous DNS names. Never deleted by
# the operator: it goes with its job (ownerReferences, garbage collection).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create"]
# Each job's PodDisruptionBudget (minAvailable = its world size, so a drain waits for the
# operator's checkpoint-aware move; patched when the size changes, deleted by garbage
# collection via ownerRefs).
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The checkpoint claim a job may ask for (deleted by garbage collection via ownerRefs).
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create"]
{{- if .Values.networkPolicy.enabled }}
# Each job's NetworkPolicy (only its own pods reach its workers' rendezvous ports;
# patched back when it differs, deleted by garbage collection via ownerRefs). None with
# networkPolicy.enabled=false: the operator then neither watches nor creates them.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch"]
{{- end }}
# Events about jobs: the operator and kopf both post core/v1 events, and only create
# them (repeats are skipped in memory, never patched).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# The jobs themselves: read once per pass (get), watched by kopf (list, watch), patched by
# kopf (its finalizer and lepton.ai/ annotations) and by the autoscaler
# (spec.workers.replicas through the main resource, with a resourceVersion precondition;
# never /scale, which is for users and HPAs), deleted for ttlSecondsAfterFinished.
# kopf and the operator only ever PATCH: no update.
- apiGroups: ["lepton.ai"]
  resources: ["leptonjobs"]
  verbs: ["get", "list", "watch", "patch", "delete"]
# The status: one merge patch per pass (the operator never reads /status: the GET of the
# job carries it).
- apiGroups: ["lepton.ai"]
  resources: ["leptonjobs/status"]
  verbs: ["patch"]
# Every child carries an ownerReference to its job with blockOwnerDeletion: true. Where
# the OwnerReferencesPermissionEnforcement admission plugin is on (OpenShift's default),
# setting that needs `update` on the owner's finalizers subresource, or every create is
# refused. Nothing else uses it.
- apiGroups: ["lepton.ai"]
  resources: ["leptonjobs/finalizers"]
  verbs: ["update"]
{{- end }}

{{/* Cluster-scoped reads in both modes: kopf lists and watches CRDs to notice its
resources (it never gets one); the operator lists nodes (read-only) to see lost and
cordoned nodes under its workers and, for the cluster allocator, their allocatable GPUs;
and it lists PriorityClasses (read-only): a job's priorityClassName is its priority.
In cluster-wide mode the allocator also lists the pods of every namespace (the pods rule
of the ClusterRole) to subtract the GPUs of pods that are not LeptonJob workers. */}}
{{- define "lepton-operator.crdRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list"]
- apiGroups: ["scheduling.k8s.io"]
  resources: ["priorityclasses"]
  verbs: ["list"]
{{- end }}
