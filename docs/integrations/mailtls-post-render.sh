#!/bin/sh
# Helm --post-renderer for the recipes whose chart lacks a hook (docker-mailserver: the
# agent container; Mailu: the pod's ServiceAccount): kustomizes Helm's output with the
# strategic-merge patch named by $MAILTLS_PATCH. Needs kubectl (kubectl kustomize).
#   MAILTLS_PATCH=docker-mailserver.agent-patch.yaml \
#     helm install ... --post-renderer ./mailtls-post-render.sh
set -eu
patch=${MAILTLS_PATCH:?set MAILTLS_PATCH to the patch file}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat > "$dir/all.yaml"
cp "$patch" "$dir/patch.yaml"
printf 'resources: [all.yaml]\npatches:\n  - path: patch.yaml\n' > "$dir/kustomization.yaml"
kubectl kustomize "$dir"
