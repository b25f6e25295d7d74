"""The whole operator against real Postfix: policy objects in the API emulation, pods that are
real local Postfix instances, real mail to real sinks (DESIGN.md §3, §5, §7).

This is the code path of production with two seams swapped: the API server is the emulation
and the PodRunner is the local runner, which runs the very same argv.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import kopf
import kubernetes.client
import pytest

from mailtls_operator.controller import Config, Operator, build_registry
from mailtls_operator.kube import Kube
from mailtls_operator.local import LocalInstance, LocalPodRunner, SmtpSink
from mailtls_operator.render import REVISION_KEY
from tests.integration.apiserver import ApiServer

from .conftest import PodFactory

pytestmark = [pytest.mark.postfix, pytest.mark.integration]
GROUP, VERSION, PLURAL = "mailtls.io", "v1alpha1", "mailtlspolicies"


def pod_object(name: str, inst: LocalInstance, instance: str = "relay") -> dict[str, Any]:
    """The Kubernetes view of a local instance: labels and annotations as a chart sets them."""
    return {"metadata": {"name": name, "namespace": "mail",
                         "labels": {"mailtls.io/instance": instance},
                         "annotations": {"mailtls.io/map-path": str(inst.map_path),
                                         "mailtls.io/map-type": inst.settings.map_type}},
            "spec": {"containers": [{"name": "postfix", "image": "postfix"}]},
            "status": {"phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True"}]}}


class Kubectl:
    def __init__(self, server: ApiServer, client: kubernetes.client.ApiClient) -> None:
        self.server = server
        self.custom = kubernetes.client.CustomObjectsApi(client)

    async def apply(self, name: str, **spec: Any) -> None:
        obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MailTLSPolicy",
               "metadata": {"name": name, "namespace": "mail"}, "spec": spec}
        if self.server.get_object(PLURAL, "mail", name) is None:
            await asyncio.to_thread(self.custom.create_namespaced_custom_object, GROUP, VERSION,
                                    "mail", PLURAL, obj)
        else:
            await asyncio.to_thread(
                self.custom.patch_namespaced_custom_object, GROUP, VERSION, "mail", PLURAL, name,
                [{"op": "replace", "path": "/spec", "value": spec}],
                _content_type="application/json-patch+json")

    def ready(self, name: str) -> dict[str, Any] | None:
        obj = self.server.get_object(PLURAL, "mail", name) or {}
        return next((c for c in (obj.get("status") or {}).get("conditions", [])
                     if c["type"] == "Ready"), None)

    async def until_ready(self, name: str, reason: str = "RolledOut",
                          timeout: float = 20.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            cond = self.ready(name)
            return cond if cond and cond["reason"] == reason else None
        result: dict[str, Any] = await self.server.wait_until(check, timeout)
        return result

    def status(self, name: str) -> dict[str, Any]:
        obj = self.server.get_object(PLURAL, "mail", name) or {}
        return obj.get("status") or {}


@pytest.fixture
def kubectl(apiserver: ApiServer, kube_client: kubernetes.client.ApiClient) -> Kubectl:
    return Kubectl(apiserver, kube_client)


@asynccontextmanager
async def operator(run_operator: Any, kube_client: Any, runner: LocalPodRunner,
                   **cfg: Any) -> AsyncIterator[Operator]:
    op = Operator(Kube(kube_client), runner,
                  Config(**{"debounce": 0.1, "max_delay": 1.0, "retry_base": 0.3, **cfg}))
    async with run_operator(build_registry(), memo=kopf.Memo(operator=op)):
        yield op


async def poll(predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    """For facts outside the API server (mail in a sink, a Postfix log line)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := predicate()):
        if loop.time() > deadline:
            raise TimeoutError(f"not met within {timeout} s")
        await asyncio.sleep(0.05)
    return value


async def test_encrypt_defers_until_may_is_rolled_out_to_every_pod(
        make_pod: PodFactory, plain: SmtpSink, runner: LocalPodRunner, apiserver: ApiServer,
        kubectl: Kubectl, run_operator: Any, kube_client: Any) -> None:
    routes = {"plain.example": f"smtp:{plain.nexthop}"}
    pods = [make_pod(f"relay-{i}", routes=routes) for i in range(2)]
    for (pod, inst) in pods:
        apiserver.seed("v1/pods", pod_object(pod.name, inst))
    async with operator(run_operator, kube_client, runner):
        await kubectl.apply("plain-partner", destinations=[plain.nexthop], level="encrypt")
        ready = await kubectl.until_ready("plain-partner")
        assert "relay: 2/2 pods verified" in ready["message"]
        status = kubectl.status("plain-partner")
        revision = status["instances"][0]["revision"]
        assert status["instances"][0] == {"name": "relay", "revision": revision,
                                          "podsUpdated": 2, "podsTotal": 2}
        for (pod, inst) in pods:
            assert inst.query(plain.nexthop) == "encrypt"
            assert inst.query(REVISION_KEY) == f"secure match=rev-{revision[:16]}"
            obj = apiserver.get_object("v1/pods", "mail", pod.name)
            assert obj is not None
            assert obj["metadata"]["annotations"]["mailtls.io/applied-revision"] == revision

        relay0 = pods[0][1]
        qid = relay0.submit(["user@plain.example"])
        deferred = await asyncio.to_thread(relay0.wait_for_delivery, qid, status="deferred")
        assert "TLS is required, but was not offered" in deferred.reason
        assert plain.messages == []

        await kubectl.apply("plain-partner", destinations=[plain.nexthop], level="may")
        await poll(lambda: kubectl.status("plain-partner")["instances"][0]["revision"]
                   != revision)
        await kubectl.until_ready("plain-partner")
        assert all(inst.query(plain.nexthop) == "may" for _, inst in pods)
        relay0.flush()
        await poll(lambda: plain.messages)
        assert list(plain.messages[0].rcpt_tos) == ["user@plain.example"]


async def test_pods_are_updated_one_at_a_time_and_reapplying_runs_nothing(
        make_pod: PodFactory, plain: SmtpSink, runner: LocalPodRunner, apiserver: ApiServer,
        kubectl: Kubectl, run_operator: Any, kube_client: Any) -> None:
    pods = [make_pod(f"relay-{i}") for i in range(3)]
    for (pod, inst) in pods:
        apiserver.seed("v1/pods", pod_object(pod.name, inst))
    async with operator(run_operator, kube_client, runner) as op:
        await kubectl.apply("p", destinations=["a.example"], level="encrypt")
        await kubectl.until_ready("p")
        reloads = [c.pod.name for c in runner.calls if c.argv[:1] == ("postfix",)]
        assert reloads == ["relay-0", "relay-1", "relay-2"]
        # one pod after the other: each pod's commands form one contiguous run
        sequence = [c.pod.name for c in runner.calls if c.argv[0] != "postconf"]
        runs = [name for i, name in enumerate(sequence) if i == 0 or sequence[i - 1] != name]
        assert runs == ["relay-0", "relay-1", "relay-2"]

        before = len(runner.calls)
        await kubectl.apply("p", destinations=["a.example"], level="encrypt")  # same spec
        op_state = op.states[("mail", "relay")]
        rollouts = op_state.rollouts
        await asyncio.sleep(0.5)
        assert len(runner.calls) == before
        assert op_state.rollouts == rollouts


async def test_a_failing_pod_stops_the_rollout_and_the_status_says_why(
        make_pod: PodFactory, runner: LocalPodRunner, apiserver: ApiServer, kubectl: Kubectl,
        run_operator: Any, kube_client: Any) -> None:
    pods = [make_pod(f"relay-{i}") for i in range(2)]
    for (pod, inst) in pods:
        apiserver.seed("v1/pods", pod_object(pod.name, inst))
    async with operator(run_operator, kube_client, runner, retry_base=0.5):
        await kubectl.apply("p", destinations=["a.example"], level="may")
        await kubectl.until_ready("p")
        old = pods[1][1].query(REVISION_KEY)
        pods[0][1].lock_map_dir()  # relay-0 goes first and cannot write its map directory
        try:
            await kubectl.apply("p", destinations=["a.example"], level="encrypt")
            failed = await kubectl.until_ready("p", reason="RolloutFailed")
            assert "mail/relay-0" in failed["message"]
            assert "0/2 pods" in failed["message"] or "1/2" not in failed["message"]
            assert pods[1][1].query(REVISION_KEY) == old  # untouched, still the old table
            assert pods[1][1].query("a.example") == "may"
            await poll(lambda: any(e.get("reason") == "RolloutFailed"
                                   for e in apiserver.list_objects("v1/events", "mail")))
        finally:
            pods[0][1].unlock_map_dir()
        await kubectl.until_ready("p", timeout=30)  # retried with backoff, then converged
        assert all(inst.query("a.example") == "encrypt" for _, inst in pods)
