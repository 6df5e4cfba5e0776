{{/* Names: the usual Helm conventions, truncated to 63 characters (DNS label). */}}
{{- define "kubesloth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubesloth.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kubesloth.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kubesloth.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubesloth
{{- end -}}

{{- define "kubesloth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubesloth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubesloth.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubesloth.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubesloth.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kubesloth.trainerImage" -}}
{{- printf "%s:%s" .Values.trainer.image.repository (default .Chart.AppVersion .Values.trainer.image.tag) -}}
{{- end -}}

{{/* Cluster-wide when no namespaces are listed. */}}
{{- define "kubesloth.clusterWide" -}}
{{- if not .Values.watchNamespaces -}}true{{- end -}}
{{- end -}}

{{/*
Rules for the namespaced objects the operator touches (a ClusterRole's or each watched namespace's Role): exactly
the calls in operator/kube.py plus kopf's own (watch, annotations patch, warning events).
*/}}
{{- define "kubesloth.namespacedRules" }}
  # kopf watches them and keeps its bookkeeping in annotations (patch); the reconciler reads them, and deletes a
  # finished one when its ttlSecondsAfterFinished has passed.
  - apiGroups: [kubesloth.io]
    resources: [finetunejobs]
    verbs: [get, list, watch, patch, delete]
  - apiGroups: [kubesloth.io]
    resources: [finetunejobs/status]
    verbs: [patch]
  # One Job per FineTuneJob; deleted to suspend or restart it; patched (parallelism 0) to stop a failed run's
  # retries while keeping its pods.
  - apiGroups: [batch]
    resources: [jobs]
    verbs: [create, get, list, watch, patch, delete]
  # Phase, exit codes and the pod IP whose metrics give progress (scraped directly, no pods/proxy).
  - apiGroups: [""]
    resources: [pods]
    verbs: [list, watch]
  # The FineTuneJob spec the trainer pod mounts (update: rewritten while no run has started from it; list/watch:
  # the operator's watch cache, label-selected to its own).
  - apiGroups: [""]
    resources: [configmaps]
    verbs: [create, get, update, list, watch]
  - apiGroups: [""]
    resources: [events]
    verbs: [create]
{{- end }}

{{/* Cluster-scoped reads: kopf watches CRDs to follow the resources it serves (cluster-scoped: a ClusterRole). */}}
{{- define "kubesloth.clusterRules" }}
  - apiGroups: [apiextensions.k8s.io]
    resources: [customresourcedefinitions]
    verbs: [list, watch]
{{- end }}
