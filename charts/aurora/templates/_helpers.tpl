{{- define "aurora.labels" -}}
app.kubernetes.io/part-of: aurora
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{- define "aurora.operatorLabels" -}}
app.kubernetes.io/name: aurora-operator
app.kubernetes.io/component: operator
{{- end }}

{{- define "aurora.redisSecret" -}}
{{- .Values.redis.existingSecret | default "aurora-redis" -}}
{{- end }}

{{- define "aurora.managedRedisUrl" -}}
redis://aurora-redis.{{ .Release.Namespace }}.svc:6379/0
{{- end }}

{{/* What the operator may do with Speculators and their children (both scopes). */}}
{{- define "aurora.operatorRules" -}}
- apiGroups: ["aurora.dev"]
  resources: ["speculators"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["aurora.dev"]
  resources: ["speculators/status"]
  verbs: ["patch"]
- apiGroups: ["aurora.dev"]
  resources: ["speculators/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps", "persistentvolumeclaims"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
