"""The ``restart`` strategy: let the workload's own rolling update load the new table.

The revision is set as a pod-template annotation of the Deployment or
StatefulSet that owns the instance's pods; Kubernetes replaces the pods one by
one (honouring maxUnavailable and PodDisruptionBudgets) and each new pod loads
the table from the ConfigMap at start.  A pod counts as updated once it is
Ready and carries the revision in its own annotations (copied from the
template).
"""

from __future__ import annotations

from dataclasses import dataclass

from .kube import Kube, NotFound
from .world import ANN_TEMPLATE_REVISION, PodRecord


@dataclass(frozen=True)
class RestartResult:
    updated: int
    failure: str | None


async def owning_workload(kube: Kube, pod: PodRecord) -> tuple[str, str] | None:
    """(kind, name) of the Deployment/StatefulSet behind ``pod``."""
    for owner in pod.owners:
        kind, name = owner.get("kind"), owner.get("name")
        if kind == "StatefulSet" and name:
            return ("StatefulSet", str(name))
        if kind == "ReplicaSet" and name:
            try:
                rs = await kube.get_replicaset(pod.namespace, str(name))
            except NotFound:
                return None
            for rs_owner in (rs.get("metadata") or {}).get("ownerReferences") or []:
                if rs_owner.get("kind") == "Deployment":
                    return ("Deployment", str(rs_owner["name"]))
    return None


async def restart_rollout(kube: Kube, pods: list[PodRecord], revision: str) -> RestartResult:
    """Annotate the owning workloads' templates (once) and count pods on ``revision``."""
    workloads: set[tuple[str, str]] = set()
    for pod in pods:
        if pod.annotations.get(ANN_TEMPLATE_REVISION) == revision:
            continue
        owner = await owning_workload(kube, pod)
        if owner is None:
            return RestartResult(0, f"pod {pod.name} has no Deployment or StatefulSet owner: "
                                    "the restart strategy cannot roll it")
        workloads.add(owner)
    namespace = pods[0].namespace
    for kind, name in sorted(workloads):
        current = await kube.get_workload(kind, namespace, name)
        template = ((current.get("spec") or {}).get("template") or {}).get("metadata") or {}
        if (template.get("annotations") or {}).get(ANN_TEMPLATE_REVISION) != revision:
            await kube.annotate_workload_template(kind, namespace, name,
                                                  {ANN_TEMPLATE_REVISION: revision})
    updated = sum(1 for p in pods if p.ready and
                  p.annotations.get(ANN_TEMPLATE_REVISION) == revision)
    return RestartResult(updated, None)
