"""Offline checks of Kubernetes objects: the official OpenAPI schemas
(kubernetes-validate), our CRD for MailTLSPolicy objects, and scope sanity for the
custom kinds no schema covers (prometheus-operator's ServiceMonitor)."""

from __future__ import annotations

from typing import Any

import kubernetes_validate

from mailtls_operator.policy import validate_object

from .kit import KUBE_VERSION, Obj

#: Custom kinds the packaging emits, their scope, and the top-level fields they may have.
CUSTOM_KINDS: dict[tuple[str, str], tuple[str, set[str]]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("Namespaced", {"spec"}),
    ("monitoring.coreos.com/v1", "PrometheusRule"): ("Namespaced", {"spec"}),
}

#: Built-in kinds that are cluster-scoped (the rest the packaging emits are namespaced).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
                  "ValidatingAdmissionPolicyBinding",
                  "CustomResourceDefinition"}


def describe(obj: Obj) -> str:
    meta = obj.get("metadata", {})
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {where}{meta.get('name')}"


def problems(obj: Obj) -> list[str]:
    """Why the API server would refuse ``obj`` (empty: it would accept it)."""
    api, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    meta: dict[str, Any] = obj.get("metadata") or {}
    if not meta.get("name"):
        return ["metadata.name is missing"]
    if api.startswith("mailtls.io/"):
        return [str(e) for e in validate_object(obj)]
    if (api, kind) in CUSTOM_KINDS:
        scope, fields = CUSTOM_KINDS[(api, kind)]
        out = [f"unexpected field {f}" for f in sorted(set(obj) - fields
                                                        - {"apiVersion", "kind", "metadata"})]
        if (scope == "Cluster") == bool(meta.get("namespace")):
            out.append(f"{scope}-scoped kind with namespace {meta.get('namespace')!r}")
        return out
    out = []
    if (kind in CLUSTER_SCOPED) == bool(meta.get("namespace")):
        out.append(f"namespace {meta.get('namespace')!r} on a "
                   f"{'cluster' if kind in CLUSTER_SCOPED else 'namespaced'} kind")
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        out.append(f"{path}: {exc.message}")
    except kubernetes_validate.SchemaNotFoundError as exc:
        out.append(exc.message)
    return out


def all_problems(objects: list[Obj]) -> list[str]:
    return [f"{describe(o)}: {p}" for o in objects for p in problems(o)]
