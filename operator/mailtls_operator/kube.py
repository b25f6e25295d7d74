"""The operator's Kubernetes API calls, through the official ``kubernetes`` client.

Every write the operator makes is here, so RBAC can be checked against one
list (``API_CALLS``).  The client is synchronous: each call runs in a worker
thread so the event loop (Kopf's watches, the rollouts) never blocks.  Bodies
are plain dicts both ways (``_preload_content=False`` + JSON), the same shape
Kopf hands to handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .crd import GROUP, PLURAL, VERSION

CRD_NAME = f"{PLURAL}.{GROUP}"
MERGE = "application/merge-patch+json"

# (verb, group, resource) of every call below: the RBAC contract (tests/contract).
API_CALLS: frozenset[tuple[str, str, str]] = frozenset({
    ("get", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("list", GROUP, PLURAL),
    ("patch", GROUP, f"{PLURAL}/status"),
    ("patch", GROUP, "mailtlsdiscoveries/status"),  # discovery (issue 16)
    ("list", "", "pods"),
    ("patch", "", "pods"),
    ("list", "", "configmaps"),
    ("get", "", "configmaps"),
    ("create", "", "configmaps"),
    ("patch", "", "configmaps"),
    ("delete", "", "configmaps"),
    ("create", "", "events"),
    ("get", "apps", "replicasets"),
    ("patch", "apps", "deployments"),
    ("patch", "apps", "statefulsets"),
    ("get", "apps", "deployments"),
    ("get", "apps", "statefulsets"),
    ("get", "coordination.k8s.io", "leases"),
    ("create", "coordination.k8s.io", "leases"),
    ("patch", "coordination.k8s.io", "leases"),
})


class NotFound(Exception):
    """The object does not exist (404)."""


class Conflict(Exception):
    """The object changed or exists already (409)."""


def _decode(response: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(response.data or b"{}")
    return data


class Kube:
    """Async facade over the official client for exactly the calls the operator needs."""

    def __init__(self, api_client: client.ApiClient, *, timeout: float = 30.0) -> None:
        self.api_client = api_client
        self.timeout = timeout
        """Seconds per call: the official client waits forever by default, and a hung call
        would stall an instance's worker."""
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.ext = client.ApiextensionsV1Api(api_client)
        self.coordination = client.CoordinationV1Api(api_client)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            try:
                return _decode(fn(*args, _preload_content=False,
                                  _request_timeout=self.timeout, **kwargs))
            except ApiException as exc:
                if exc.status == 404:
                    raise NotFound(str(exc.reason)) from exc
                if exc.status == 409:
                    raise Conflict(str(exc.reason)) from exc
                raise
        return await asyncio.to_thread(run)

    # ------------------------------------------------------------------ reads

    async def crd_present(self) -> bool:
        try:
            await self._call(self.ext.read_custom_resource_definition, CRD_NAME)
        except NotFound:
            return False
        return True

    async def list_policies(self, namespace: str | None) -> list[dict[str, Any]]:
        if namespace:
            out = await self._call(self.custom.list_namespaced_custom_object, GROUP, VERSION,
                                   namespace, PLURAL)
        else:
            out = await self._call(self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)
        return list(out.get("items") or [])

    async def list_pods(self, namespace: str | None, selector: str) -> list[dict[str, Any]]:
        if namespace:
            out = await self._call(self.core.list_namespaced_pod, namespace,
                                   label_selector=selector)
        else:
            out = await self._call(self.core.list_pod_for_all_namespaces, label_selector=selector)
        return list(out.get("items") or [])

    async def list_configmaps(self, namespace: str | None, selector: str
                              ) -> list[dict[str, Any]]:
        if namespace:
            out = await self._call(self.core.list_namespaced_config_map, namespace,
                                   label_selector=selector)
        else:
            out = await self._call(self.core.list_config_map_for_all_namespaces,
                                   label_selector=selector)
        return list(out.get("items") or [])

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._call(self.core.read_namespaced_config_map, name, namespace)

    async def get_replicaset(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._call(self.apps.read_namespaced_replica_set, name, namespace)

    async def get_workload(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        fn = (self.apps.read_namespaced_deployment if kind == "Deployment"
              else self.apps.read_namespaced_stateful_set)
        return await self._call(fn, name, namespace)

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._call(self.coordination.read_namespaced_lease, name, namespace)

    # ----------------------------------------------------------------- writes

    async def create_lease(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self.coordination.create_namespaced_lease,
                                body["metadata"]["namespace"], body)

    async def patch_lease(self, namespace: str, name: str, patch: dict[str, Any]
                          ) -> dict[str, Any]:
        """Merge patch; a ``metadata.resourceVersion`` in it makes the API server refuse
        (409) if the Lease changed since it was read."""
        return await self._call(self.coordination.patch_namespaced_lease, name, namespace,
                                patch, _content_type=MERGE)

    async def create_configmap(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self.core.create_namespaced_config_map,
                                body["metadata"]["namespace"], body)

    async def replace_configmap_content(self, body: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch our labels, annotation and data; keys we no longer want are nulled."""
        return await self._call(self.core.patch_namespaced_config_map,
                                body["metadata"]["name"], body["metadata"]["namespace"], body,
                                _content_type=MERGE)

    async def delete_configmap(self, namespace: str, name: str) -> None:
        with contextlib.suppress(NotFound):
            await self._call(self.core.delete_namespaced_config_map, name, namespace)

    async def patch_policy_status(self, namespace: str, name: str,
                                  status: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self.custom.patch_namespaced_custom_object_status, GROUP,
                                VERSION, namespace, PLURAL, name, {"status": status},
                                _content_type=MERGE)

    async def patch_discovery_status(self, namespace: str, name: str,
                                     status: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self.custom.patch_namespaced_custom_object_status, GROUP,
                                VERSION, namespace, "mailtlsdiscoveries", name,
                                {"status": status}, _content_type=MERGE)

    async def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]
                           ) -> dict[str, Any]:
        return await self._call(self.core.patch_namespaced_pod, name, namespace,
                                {"metadata": {"annotations": annotations}}, _content_type=MERGE)

    async def annotate_workload_template(self, kind: str, namespace: str, name: str,
                                         annotations: dict[str, str]) -> dict[str, Any]:
        fn = (self.apps.patch_namespaced_deployment if kind == "Deployment"
              else self.apps.patch_namespaced_stateful_set)
        body = {"spec": {"template": {"metadata": {"annotations": annotations}}}}
        return await self._call(fn, name, namespace, body, _content_type=MERGE)

    async def post_event(self, involved: dict[str, Any], event_type: str, reason: str,
                         message: str) -> None:
        """A core/v1 Event about ``involved`` (kind, namespace, name, uid, apiVersion)."""
        now = datetime.now(UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{involved['name']}.", "namespace":
                         involved["namespace"]},
            "involvedObject": involved,
            "type": event_type, "reason": reason, "message": message[:1024],
            "source": {"component": "mailtls-operator"},
            "reportingComponent": "mailtls-operator", "reportingInstance": "mailtls-operator",
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
            "eventTime": None,
        }
        await self._call(self.core.create_namespaced_event, involved["namespace"], body)
