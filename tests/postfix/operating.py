"""The whole operator against real Postfix pods on the real control plane: what the tests
that drive it share.

The pods are real Pod objects in the test's namespace, bound to the session's kwok node
(``spec.nodeName``): kwok makes them Running and Ready, and deletes them, as a kubelet
would; nothing runs their images.  Behind each pod is a local Postfix instance
(:class:`~testbed.LocalInstance`): the operator runs in-process (Kopf in a thread of its
own, :mod:`testbed.kopfthread`) with the :class:`~testbed.LocalPodRunner`, which runs the
very argv the exec strategy sends, against that instance.  Exec through kube-apiserver
into kwok is proven by tests/cluster/test_exec_through_apiserver.py.

The test's own reads and writes are kubectl's, through the official client as the
admin; they block, so from async code they run in a thread (:func:`poll` does).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, cast

import kopf
import kubernetes.client

from mailtls_operator.controller import Config, Operator, build_registry
from mailtls_operator.crd import GROUP, PLURAL, VERSION
from mailtls_operator.kube import Kube
from mailtls_operator.podrunner import PodRef, PodRunner
from testbed import LocalInstance, wait_until
from testbed.auditlog import AuditTail, Request
from testbed.controlplane import ControlPlane
from testbed.kopfthread import run_operator

if TYPE_CHECKING:
    from .conftest import PodFactory

INSTANCE = "relay"
EXEC_SUBRESOURCES = ("exec", "attach", "portforward")


async def poll(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    """Wait until ``predicate()`` is truthy and return its value; it runs in a thread (it
    may ask the API server or a Postfix instance) every 50 ms.  TimeoutError names
    ``what`` and the last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := await asyncio.to_thread(predicate)):
        if loop.time() > deadline:
            raise TimeoutError(f"not within {timeout:g} s: {what or predicate!r} "
                               f"(last: {value!r})")
        await asyncio.sleep(0.05)
    return value


def _not_found(exc: kubernetes.client.ApiException) -> bool:
    return bool(exc.status == 404)


class Kubectl:
    """What a user does with kubectl in the test's namespace, as the admin.  Reads are
    synchronous (one request each); :meth:`apply` and the waits are coroutines."""

    def __init__(self, plane: ControlPlane, client: kubernetes.client.ApiClient,
                 namespace: str, node: str) -> None:
        self.plane = plane
        self.client: Any = client  # plain dicts in and out, not the client's models
        self.ns = namespace
        self.node = node
        self.core: Any = kubernetes.client.CoreV1Api(client)
        self.custom: Any = kubernetes.client.CustomObjectsApi(client)

    # -- custom objects ----------------------------------------------------------------

    def _apply(self, obj: dict[str, Any], plural: str) -> dict[str, Any]:
        try:
            return cast(dict[str, Any], self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.ns, plural, obj))
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise
        return cast(dict[str, Any], self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.ns, plural, obj["metadata"]["name"],
            [{"op": "replace", "path": "/spec", "value": obj["spec"]}],
            _content_type="application/json-patch+json"))

    async def apply(self, name: str, **spec: Any) -> str:
        """Create the MailTLSPolicy or replace its spec (kubectl apply); returns the
        stored resourceVersion."""
        obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MailTLSPolicy",
               "metadata": {"name": name, "namespace": self.ns}, "spec": spec}
        stored = await asyncio.to_thread(self._apply, obj, PLURAL)
        return str(stored["metadata"]["resourceVersion"])

    async def apply_object(self, obj: dict[str, Any], plural: str) -> dict[str, Any]:
        """Create or replace the spec of any object of ours (a MailTLSDiscovery)."""
        obj = {**obj, "metadata": {**obj["metadata"], "namespace": self.ns}}
        return await asyncio.to_thread(self._apply, obj, plural)

    def _read(self, read: Callable[..., Any], *args: Any) -> dict[str, Any] | None:
        """``read(*args)`` as a plain dict; None for 404."""
        try:
            return cast(dict[str, Any], self.client.sanitize_for_serialization(read(*args)))
        except kubernetes.client.ApiException as exc:
            if _not_found(exc):
                return None
            raise

    def get(self, name: str, plural: str = PLURAL) -> dict[str, Any] | None:
        return self._read(self.custom.get_namespaced_custom_object, GROUP, VERSION, self.ns,
                          plural, name)

    def status(self, name: str, plural: str = PLURAL) -> dict[str, Any]:
        return cast(dict[str, Any], (self.get(name, plural) or {}).get("status") or {})

    def ready(self, name: str) -> dict[str, Any] | None:
        return next((c for c in self.status(name).get("conditions", [])
                     if c["type"] == "Ready"), None)

    async def until_ready(self, name: str, reason: str = "RolledOut",
                          timeout: float = 20.0) -> dict[str, Any]:
        """The policy's Ready condition, once its reason is ``reason``."""
        def check() -> dict[str, Any] | None:
            cond = self.ready(name)
            return cond if cond and cond["reason"] == reason else None
        found: dict[str, Any] = await poll(check, timeout, f"{name} Ready/{reason}")
        return found

    async def first_probe(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """The policy's first ``status.probes[]`` item, once there is one."""
        def check() -> dict[str, Any] | None:
            probes = self.status(name).get("probes") or []
            return cast(dict[str, Any], probes[0]) if probes else None
        found: dict[str, Any] = await poll(check, timeout, f"{name} probed")
        return found

    # -- core objects ------------------------------------------------------------------

    def pod(self, name: str) -> dict[str, Any] | None:
        return self._read(self.core.read_namespaced_pod, name, self.ns)

    def configmap(self, name: str = f"{INSTANCE}-mailtls") -> dict[str, Any] | None:
        return self._read(self.core.read_namespaced_config_map, name, self.ns)

    def put_configmap(self, body: dict[str, Any]) -> None:
        """Create the ConfigMap, or replace it whole without a resourceVersion (an
        unconditional update: what the test writes wins, as a hand edit would)."""
        body = {**body, "metadata": {**body["metadata"], "namespace": self.ns}}
        try:
            self.core.create_namespaced_config_map(self.ns, body)
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise
            self.core.replace_namespaced_config_map(body["metadata"]["name"], self.ns, body)

    def events(self) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_event(self.ns).items
        return [cast(dict[str, Any], self.client.sanitize_for_serialization(e)) for e in items]

    def delete_pod(self, name: str) -> None:
        """Delete as kubectl does (graceful): kwok, the "kubelet", finishes it."""
        self.core.delete_namespaced_pod(name, self.ns)

    # -- pods --------------------------------------------------------------------------

    def pod_body(self, name: str, inst: LocalInstance, *, agent: str | None = None,
                 instance: str = INSTANCE) -> dict[str, Any]:
        """The pod of a local instance as a chart makes it: its instance label and its
        table's path and type; with ``agent`` (a ServiceAccount), the agent strategy's
        sidecar and annotation.  Bound to the kwok node."""
        annotations = {"mailtls.io/map-path": str(inst.map_path),
                       "mailtls.io/map-type": inst.settings.map_type}
        containers = [{"name": "postfix", "image": "registry.invalid/postfix:test"}]
        spec: dict[str, Any] = {"nodeName": self.node, "containers": containers}
        if agent is not None:
            annotations["mailtls.io/strategy"] = "agent"
            containers.append({"name": "agent", "image": "registry.invalid/mailtls:test"})
            spec["serviceAccountName"] = agent
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "labels": {"mailtls.io/instance": instance},
                             "annotations": annotations},
                "spec": spec}

    def run_pods(self, bodies: Iterable[dict[str, Any]], timeout: float = 30.0) -> None:
        """Create the pods and return once kwok has made every one Running and Ready."""
        names = []
        for body in bodies:
            self.core.create_namespaced_pod(self.ns, body)
            names.append(body["metadata"]["name"])

        def ready(name: str) -> bool:
            status = (self.pod(name) or {}).get("status") or {}
            return status.get("phase") == "Running" and any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in status.get("conditions") or [])
        wait_until(lambda: all(ready(n) for n in names), timeout=timeout, interval=0.05,
                   what=f"pods {names} Running and Ready")

    # -- the audit log -----------------------------------------------------------------

    def count(self, audit: AuditTail, verbs: str | Iterable[str] | None, resource: str,
              **kwargs: Any) -> int:
        """Requests in this namespace (since the tail's start, or ``since=``), once the
        log has all those answered so far."""
        return len(self.requests(audit, verbs, resource, **kwargs))

    def requests(self, audit: AuditTail, verbs: str | Iterable[str] | None, resource: str,
                 **kwargs: Any) -> list[Request]:
        audit.barrier()
        return [r for r in audit.select(verbs, resource, **kwargs) if r.namespace == self.ns]

    def exec_requests(self, audit: AuditTail) -> int:
        """exec, attach and port-forward requests into this namespace's pods."""
        return sum(self.count(audit, None, "pods", subresource=sub)
                   for sub in EXEC_SUBRESOURCES)


async def seed_pods(make_pod: PodFactory, kubectl: Kubectl, count: int, *,
                    agent: str | None = None,
                    **settings: Any) -> list[tuple[PodRef, LocalInstance]]:
    """``count`` real Postfix pods relay-0.. of instance relay, Running and Ready."""
    pods = [make_pod(f"relay-{i}", namespace=kubectl.ns, **settings) for i in range(count)]
    await asyncio.to_thread(kubectl.run_pods, [kubectl.pod_body(pod.name, inst, agent=agent)
                                                for pod, inst in pods])
    return pods


def make_operator(kubectl: Kubectl, runner: PodRunner, **cfg: Any) -> Operator:
    """The operator of ``mailtls run`` in the test's namespace, fast, with ``runner``."""
    config = {"debounce": 0.1, "max_delay": 1.0, "retry_base": 0.3, "probe_enforced": False,
              **cfg}
    return Operator(Kube(kubectl.client), runner, Config(namespaces=[kubectl.ns], **config))


@asynccontextmanager
async def started(kubectl: Kubectl, op: Operator, *,
                  settle: bool = True) -> AsyncIterator[Operator]:
    """``op`` under Kopf until the block ends.  The block starts with the operator
    watching and, with ``settle``, idle: done with what it found at start (pods without
    a table get an empty one), so what the test does next is all the operator does."""
    async with run_operator(kubectl.plane, build_registry(), namespaces=[kubectl.ns],
                            memo=kopf.Memo(operator=op)):
        if settle:
            await poll(lambda: op.idle, 30, "the operator idle after its start")
        yield op


@asynccontextmanager
async def operator(kubectl: Kubectl, runner: PodRunner, *, settle: bool = True,
                   **cfg: Any) -> AsyncIterator[Operator]:
    """:func:`make_operator` then :func:`started`."""
    async with started(kubectl, make_operator(kubectl, runner, **cfg), settle=settle) as op:
        yield op
