"""Helpers for driving the operator through the API emulation, as a user with kubectl would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import kopf
import kubernetes.client

from mailtls_operator.controller import Config, Operator, build_registry
from mailtls_operator.kube import Kube
from mailtls_operator.podrunner import ExecResult, PodRef
from mailtls_operator.render import REVISION_KEY
from testbed.apiserver import ApiServer

GROUP, VERSION, PLURAL = "mailtls.io", "v1alpha1", "mailtlspolicies"


class NoPodsRunner:
    """These tests have no pods: any pod command is a bug in the test or the operator."""

    def __init__(self) -> None:
        self.calls: list[tuple[PodRef, Sequence[str]]] = []

    async def run(self, pod: PodRef, argv: Sequence[str], *, stdin: bytes | None = None,
                  timeout: float = 60.0) -> ExecResult:
        self.calls.append((pod, argv))
        raise AssertionError(f"unexpected pod command {argv} in {pod}")


def policy(name: str, namespace: str = "mail", **spec: Any) -> dict[str, Any]:
    spec.setdefault("instances", ["relay"])
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MailTLSPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


class Cluster:
    """What a user does with kubectl, through the official client (off the test loop)."""

    def __init__(self, server: ApiServer, client: kubernetes.client.ApiClient) -> None:
        self.server = server
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.core = kubernetes.client.CoreV1Api(client)

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        if self.server.get_object(PLURAL, ns, name) is None:
            created = await asyncio.to_thread(self.custom.create_namespaced_custom_object,
                                              GROUP, VERSION, ns, PLURAL, obj)
            return cast(dict[str, Any], created)  # the client types custom objects as object
        patched = await asyncio.to_thread(  # like kubectl apply: the whole spec is replaced
            self.custom.patch_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, name,
            [{"op": "replace", "path": "/spec", "value": obj["spec"]}],
            _content_type="application/json-patch+json")
        return cast(dict[str, Any], patched)

    async def delete(self, namespace: str, name: str) -> None:
        await asyncio.to_thread(self.custom.delete_namespaced_custom_object, GROUP, VERSION,
                                namespace, PLURAL, name)

    def configmap(self, namespace: str, instance: str) -> dict[str, Any] | None:
        return self.server.get_object("v1/configmaps", namespace, f"{instance}-mailtls")

    def table(self, namespace: str, instance: str) -> list[str] | None:
        cm = self.configmap(namespace, instance)
        if cm is None:
            return None
        text = (cm.get("data") or {}).get("tls_policy", "")
        return [ln for ln in text.splitlines()
                if ln and not ln.startswith("#") and not ln.startswith(REVISION_KEY)]

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        obj = self.server.get_object(PLURAL, namespace, name) or {}
        return obj.get("status") or {}

    def condition(self, namespace: str, name: str, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.status(namespace, name).get("conditions", [])
                     if c["type"] == type_), None)

    def has(self, namespace: str, name: str, type_: str) -> dict[str, Any]:
        """The condition, which the test expects to be there."""
        found = self.condition(namespace, name, type_)
        assert found is not None, f"{namespace}/{name} has no {type_} condition"
        return found

    async def until(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        return await self.server.wait_until(predicate, timeout)

    def cm_writes(self) -> int:
        return self.server.request_count(("create", "patch", "update"), "configmaps")


def make_operator(kube_client: kubernetes.client.ApiClient, **cfg: Any) -> Operator:
    config = Config(**{"debounce": 0.15, "max_delay": 1.5, "retry_base": 0.2, **cfg})
    return Operator(Kube(kube_client), NoPodsRunner(), config)


def idle(op: Operator) -> bool:
    """Read from the test's thread: flags only, no awaiting across loops."""
    return op.idle


@asynccontextmanager
async def operating(run_operator: Any, kube_client: kubernetes.client.ApiClient,
                    **cfg: Any) -> AsyncIterator[Operator]:
    op = make_operator(kube_client, **cfg)
    async with run_operator(build_registry(), memo=kopf.Memo(operator=op)):
        yield op
