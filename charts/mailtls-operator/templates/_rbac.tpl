{{/*
THE list of API rights the operator needs: every rule the chart grants comes from the
three templates below, and each says whose need it is, as Kopf's deployment-rbac.yaml
does: "Framework" (Kopf itself) or "Application" (mailtls-operator's own calls).
The kustomize base is generated from this render (tests/contract checks it).

Kopf's cluster observation (list/watch customresourcedefinitions, and list/watch
namespaces when namespaces are given) is deliberately NOT granted: the operator watches
exact namespaces (or the whole cluster) and only its own CRD, which must exist at start
(the operator sets settings.scanning.disabled = True). Nor is anything of kopf.dev: Kopf
always runs standalone (no peering); replicas coordinate through a Lease instead.
*/}}

{{/* Rules needed in every watched namespace: a Role per namespace, or the ClusterRole. */}}
{{- define "mailtls-operator.rules.namespaced" -}}
# Application: the MailTLSPolicy objects (listed at startup, then watched through Kopf).
- apiGroups: [mailtls.io]
  resources: [mailtlspolicies]
  verbs: [list, watch]
# Application: conditions, observedGeneration, entries and instances in .status.
- apiGroups: [mailtls.io]
  resources: [mailtlspolicies/status]
  verbs: [patch]
# Application: MailTLSDiscovery objects (domains whose policy is discovered from
# MTA-STS and DANE), watched through Kopf.
- apiGroups: [mailtls.io]
  resources: [mailtlsdiscoveries]
  verbs: [list, watch]
# Application: their per-domain .status (source, mode, mx, id, fetchedAt, expiresAt,
# lastError) and Ready condition.
- apiGroups: [mailtls.io]
  resources: [mailtlsdiscoveries/status]
  verbs: [patch]
# Application: Postfix pods (label mailtls.io/instance), listed and watched; patch sets
# the annotation mailtls.io/applied-revision after a verified rollout (not with the agent
# strategy: there each pod's agent writes it, and the operator only reads).
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch{{ if ne .Values.strategy "agent" }}, patch{{ end }}]
{{- if eq .Values.strategy "exec" }}
# Application (exec strategy only): postmap, postfix reload, postconf, posttls-finger,
# postqueue in the Postfix container, over the websocket exec protocol. Its upgrade
# request is a GET, authorized as get; newer API servers also require create for it
# (feature AuthorizePodWebsocketUpgradeCreatePermission), as for kubectl's POST.
- apiGroups: [""]
  resources: [pods/exec]
  verbs: [create, get]
{{- end }}
# Application: the ConfigMap <instance>-mailtls per Postfix instance (owned by the
# operator: created, updated with each revision, deleted when the instance is gone).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch, delete]
# Application: restart strategy (a pod annotated mailtls.io/strategy=restart, or the
# default): set the revision annotation on the owning workload's pod template.
- apiGroups: [apps]
  resources: [deployments, statefulsets]
  verbs: [get, patch]
# Application: a pod's owner is a ReplicaSet; its owner is the Deployment to patch.
- apiGroups: [apps]
  resources: [replicasets]
  verbs: [get]
# Framework and application: Kopf posts its events, and the operator an Event for every
# state change of a policy, both as core/v1 Events.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{/* Rules that only a ClusterRole can grant. */}}
{{- define "mailtls-operator.rules.cluster" -}}
# Application: the startup check that the MailTLSPolicy CRD is installed and serves
# v1alpha1; only this one CRD, only get.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  resourceNames: [mailtlspolicies.mailtls.io]
  verbs: [get]
{{- end }}

{{/*
Leader election (leaderElection.enabled), in the release namespace only, where the Lease
lives ($(POD_NAMESPACE)): a Role of its own, whatever the namespaces watched.
*/}}
{{- define "mailtls-operator.rules.leaderElection" -}}
# Application: leader election creates the Lease when it does not exist yet. Kubernetes
# cannot restrict a create by resourceNames (the name is not part of the request URL
# when it is authorized), so this is any Lease, but only in the release namespace.
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [create]
# Application: leader election reads, renews, takes over and releases this release's
# Lease only (get and patch with resourceNames).
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  resourceNames: [{{ include "mailtls-operator.leaseName" . }}]
  verbs: [get, patch]
{{- end }}
