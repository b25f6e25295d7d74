"""The operator's Kubernetes API calls, through the official ``kubernetes`` client.

Every write the operator makes is here, so RBAC can be checked against one
list (``API_CALLS``).  The client is synchronous: each call runs in a worker
thread so the event loop (Kopf's watches, the rollouts) never blocks.  Bodies
are plain dicts both ways (JSON in and out, no typed models), the same shape
Kopf hands to handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .crd import GROUP, PLURAL, VERSION

CRD_NAME = f"{PLURAL}.{GROUP}"
PAGE = 500
"""Objects per list request (``limit``), as kubectl and Kopf (``chunk_size``) list."""
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


class NamespaceTerminating(Exception):
    """The namespace is being deleted: the server refuses new objects in it (403 with
    cause ``NamespaceTerminating``).  Routine, not a failure: its objects are going."""


def _terminating(data: bytes) -> str | None:
    """The server's message when a 403 body names the ``NamespaceTerminating`` cause."""
    try:
        status = json.loads(data)
    except ValueError:
        return None
    details = status.get("details") if isinstance(status, dict) else None
    causes = details.get("causes") if isinstance(details, dict) else None
    if isinstance(causes, list) and any(isinstance(c, dict) and
                                        c.get("reason") == "NamespaceTerminating"
                                        for c in causes):
        return str(status.get("message", ""))[:300]
    return None


class Kube:
    """Async facade over the official client for exactly the calls the operator needs.

    Requests go through the client's ``ApiClient`` (its configuration, auth, TLS,
    retries and errors) by path, not through the generated ``CoreV1Api``-style
    classes: each of those imports the typed models of its whole API group (about
    300 for ``CoreV1Api``, 20 MiB of the operator's memory) only to check arguments
    the paths below already spell."""

    def __init__(self, api_client: client.ApiClient, *, timeout: float = 30.0) -> None:
        self.api_client = api_client
        self.timeout = timeout
        """Seconds per call: the official client waits forever by default, and a hung call
        would stall an instance's worker."""

    def _request(self, method: str, path: str, params: dict[str, str], *,
                 query: list[tuple[str, str]] | None = None, body: Any = None,
                 content_type: str = "application/json") -> dict[str, Any]:
        """One call, in the calling thread: path parameters quoted by the client."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        request = self.api_client.param_serialize(
            method=method, resource_path=path, path_params=params, query_params=query or [],
            header_params=headers, body=body, auth_settings=["BearerToken"])
        response = self.api_client.call_api(*request, _request_timeout=self.timeout)
        data = response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status <= 299:
            if response.status == 403 and (why := _terminating(data or b"")) is not None:
                raise NamespaceTerminating(why)
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        decoded: dict[str, Any] = json.loads(data or b"{}")
        return decoded

    async def _call(self, method: str, path: str, params: dict[str, str], **kwargs: Any
                    ) -> dict[str, Any]:
        """:meth:`_request` in a worker thread; 404 and 409 as :class:`NotFound` and
        :class:`Conflict`."""
        def run() -> dict[str, Any]:
            try:
                return self._request(method, path, params, **kwargs)
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
            await self._call("GET", f"/apis/{_CRD_API}/customresourcedefinitions/{{name}}",
                             {"name": CRD_NAME})
        except NotFound:
            return False
        return True

    def list_policies(self, namespace: str | None) -> AsyncIterator[dict[str, Any]]:
        return self._list(_POLICIES, namespace)

    def list_pods(self, namespace: str | None, selector: str) -> AsyncIterator[dict[str, Any]]:
        return self._list("/api/v1/{ns}pods", namespace, selector)

    def list_configmaps(self, namespace: str | None, selector: str
                        ) -> AsyncIterator[dict[str, Any]]:
        return self._list("/api/v1/{ns}configmaps", namespace, selector)

    async def _list(self, path: str, namespace: str | None, selector: str = ""
                    ) -> AsyncIterator[dict[str, Any]]:
        """A namespace's objects or, without one, the cluster's, ``PAGE`` at a time (as
        kubectl does): 10,000 policies are never one response in memory.  An expired
        continue token (410) starts the listing over; objects seen twice are simply
        recorded twice."""
        if namespace:
            path, params = path.format(ns="namespaces/{namespace}/"), {"namespace": namespace}
        else:
            path, params = path.format(ns=""), {}
        base = [("labelSelector", selector)] if selector else []
        token, restarts = "", 0
        while True:
            query = [*base, ("limit", str(PAGE))] + ([("continue", token)] if token else [])
            try:
                out = await self._call("GET", path, params, query=query)
            except ApiException as exc:
                if exc.status != 410 or not token or restarts >= 3:
                    raise
                token, restarts = "", restarts + 1
                continue
            for item in out.get("items") or []:
                yield item
            token = str((out.get("metadata") or {}).get("continue") or "")
            if not token:
                return

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._call("GET", _CONFIGMAP, {"namespace": namespace, "name": name})

    async def get_replicaset(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._call("GET", _APPS.format(kind="replicasets"),
                                {"namespace": namespace, "name": name})

    async def get_workload(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return await self._call("GET", _APPS.format(kind=_workload(kind)),
                                {"namespace": namespace, "name": name})

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._call("GET", _LEASE, {"namespace": namespace, "name": name})

    # ----------------------------------------------------------------- writes

    async def create_lease(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", _LEASES, {"namespace": body["metadata"]["namespace"]},
                                body=body)

    async def patch_lease(self, namespace: str, name: str, patch: dict[str, Any]
                          ) -> dict[str, Any]:
        """Merge patch; a ``metadata.resourceVersion`` in it makes the API server refuse
        (409) if the Lease changed since it was read."""
        return await self._call("PATCH", _LEASE, {"namespace": namespace, "name": name},
                                body=patch, content_type=MERGE)

    async def create_configmap(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", "/api/v1/namespaces/{namespace}/configmaps",
                                {"namespace": body["metadata"]["namespace"]}, body=body)

    async def replace_configmap_content(self, body: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch our labels, annotation and data; keys we no longer want are nulled."""
        meta = body["metadata"]
        return await self._call("PATCH", _CONFIGMAP,
                                {"namespace": meta["namespace"], "name": meta["name"]},
                                body=body, content_type=MERGE)

    async def delete_configmap(self, namespace: str, name: str) -> None:
        with contextlib.suppress(NotFound):
            await self._call("DELETE", _CONFIGMAP, {"namespace": namespace, "name": name})

    async def patch_policy_status(self, namespace: str, name: str,
                                  status: dict[str, Any]) -> dict[str, Any]:
        return await self._patch_status(PLURAL, namespace, name, status)

    async def patch_discovery_status(self, namespace: str, name: str,
                                     status: dict[str, Any]) -> dict[str, Any]:
        return await self._patch_status("mailtlsdiscoveries", namespace, name, status)

    async def _patch_status(self, plural: str, namespace: str, name: str,
                            status: dict[str, Any]) -> dict[str, Any]:
        return await self._call(
            "PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{plural}/{{name}}/status",
            {"namespace": namespace, "name": name}, body={"status": status},
            content_type=MERGE)

    async def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]
                           ) -> dict[str, Any]:
        return await self._call("PATCH", "/api/v1/namespaces/{namespace}/pods/{name}",
                                {"namespace": namespace, "name": name},
                                body={"metadata": {"annotations": annotations}},
                                content_type=MERGE)

    async def annotate_workload_template(self, kind: str, namespace: str, name: str,
                                         annotations: dict[str, str]) -> dict[str, Any]:
        body = {"spec": {"template": {"metadata": {"annotations": annotations}}}}
        return await self._call("PATCH", _APPS.format(kind=_workload(kind)),
                                {"namespace": namespace, "name": name}, body=body,
                                content_type=MERGE)

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
        await self._call("POST", "/api/v1/namespaces/{namespace}/events",
                         {"namespace": involved["namespace"]}, body=body)


_CRD_API = "apiextensions.k8s.io/v1"
_POLICIES = f"/apis/{GROUP}/{VERSION}/{{ns}}{PLURAL}"
_CONFIGMAP = "/api/v1/namespaces/{namespace}/configmaps/{name}"
_APPS = "/apis/apps/v1/namespaces/{{namespace}}/{kind}/{{name}}"
_LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
_LEASE = _LEASES + "/{name}"


def _workload(kind: str) -> str:
    return "deployments" if kind == "Deployment" else "statefulsets"
