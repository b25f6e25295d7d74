"""What keeps the operator small with 10,000 policies (issue 13; the figures are in
``make bench``): no typed API classes or models loaded, no Kopf memory of objects between
events, shared strings per policy, metric series only where there is something to see."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import kopf
from kopf._core.reactor.inventory import ResourceMemories

from mailtls_operator.controller import operator_options
from mailtls_operator.controller.observing import Observations
from mailtls_operator.mailqueue import DeferredSummary
from mailtls_operator.memory import Trimmer
from mailtls_operator.metrics import Metrics
from mailtls_operator.observer import PolicyProbes
from mailtls_operator.policy import load_policy
from mailtls_operator.probe.results import FAIL, PASS, ProbeOutcome
from mailtls_operator.render import render
from mailtls_operator.world import World, shared

CODE = """
import sys
import kubernetes.client
from mailtls_operator.cli import operate
from mailtls_operator.controller import Config, Operator
from mailtls_operator.execrunner import KubernetesExecRunner
from mailtls_operator.kube import Kube
api = kubernetes.client.ApiClient()
Operator(Kube(api), KubernetesExecRunner(api), Config())
apis = [m for m in sys.modules if m.startswith("kubernetes.client.api.")]
models = [m for m in sys.modules if m.startswith("kubernetes.client.models.")]
print(len(apis), len(models))
"""


def test_the_operator_loads_no_typed_api_class_nor_model() -> None:
    """``CoreV1Api`` alone imports about 300 typed models: 20 MiB the operator never uses
    (it sends and reads plain JSON)."""
    res = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    apis, models = map(int, res.stdout.split())
    assert apis == 0
    assert models < 10  # the few the client's own modules import (ObjectMeta and the like)


def test_kopf_keeps_no_memory_of_an_object_between_its_events() -> None:
    memories = operator_options()["memories"]
    assert isinstance(memories, ResourceMemories)
    assert "memories" in inspect.signature(kopf.operator).parameters
    body: Any = {"metadata": {"uid": "u1", "name": "p", "namespace": "mail"}}  # a RawBody
    memo: Any = kopf.Memo(operator="the operator")  # an AnyMemo

    async def twice() -> tuple[Any, Any]:
        return (await memories.recall(body, memobase=memo),
                await memories.recall(body, memobase=memo))

    first, second = asyncio.run(twice())
    assert first is not second and first.memo.operator == "the operator"
    assert list(memories.iter_all_memories()) == []


def _obj(name: str, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "mail", "uid": f"uid-{name}",
                         "generation": 1, "resourceVersion": "7"},
            "spec": {"destinations": [f"{name}.example"], "level": "encrypt",
                     "instances": ["relay"]},
            "status": status or {}}


def test_policies_share_their_common_strings_and_keep_no_spec() -> None:
    world = World(clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    status = {"conditions": [{"type": "Ready", "status": "True", "reason": "RolledOut",
                              "message": "relay: 2/2 pods verified revision 0123456789ab"}]}
    # each object decoded on its own, as each watch event is: equal strings, not shared
    world.upsert_policy(_obj("a", {"conditions": [dict(status["conditions"][0])]}))
    world.upsert_policy(_obj("b", {"conditions": [{k: "".join(v) for k, v in
                                                   status["conditions"][0].items()}]}))
    a, b = (world.policies["mail"][n] for n in ("a", "b"))
    assert a.status == b.status == status
    assert a.status["conditions"][0]["message"] is b.status["conditions"][0]["message"]
    assert a.policy is not None and b.policy is not None
    assert a.policy.level is b.policy.level and a.policy.value is b.policy.value
    assert a.ref is a.policy.ref and a.instances() == ("relay",)
    assert not hasattr(a, "__dict__") and not hasattr(a.policy, "__dict__")  # slotted
    assert shared({"k": ["x" * 300]}) == {"k": ["x" * 300]}  # long strings copied as they are


def test_deferred_mail_has_a_series_only_while_there_is_some() -> None:
    metrics = Metrics()
    observations = Observations(SimpleNamespace(metrics=metrics),  # type: ignore[arg-type]
                                write_statuses=lambda ns: asyncio.sleep(0),
                                may_act=lambda: True)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    policies = [load_policy(_obj(n)) for n in ("a", "b", "c")]
    tables = render(policies, instance=("mail", "relay"), now=now)
    key = ("mail", "relay")

    def series() -> dict[str, float]:
        return {s.labels["policy"]: s.value for m in metrics.registry.collect()
                if m.name == "mailtls_deferred_recipients" for s in m.samples}

    observations._deferred_metrics(key, tables, {})
    assert series() == {}
    held = DeferredSummary(3, now, "TLS is required, but was not offered", ("Q1",))
    observations._deferred_metrics(key, tables, {"b.example": held})
    assert series() == {"b": 3.0}
    observations._deferred_metrics(key, tables, {})
    assert series() == {}


def test_failing_probes_have_a_series_only_while_some_fail_the_most_any_instance_saw(
        ) -> None:
    metrics = Metrics()
    observations = Observations(SimpleNamespace(metrics=metrics),  # type: ignore[arg-type]
                                write_statuses=lambda ns: asyncio.sleep(0),
                                may_act=lambda: True)
    now = datetime(2026, 1, 1, tzinfo=UTC)

    def probed(*results: str) -> PolicyProbes:
        return PolicyProbes("v", now, [ProbeOutcome(f"d{i}.example", r, "", "", now)
                                       for i, r in enumerate(results)])

    def series() -> dict[str, float]:
        return {s.labels["policy"]: s.value for m in metrics.registry.collect()
                if m.name == "mailtls_probe_failures" for s in m.samples}

    relay, edge = ("mail", "relay"), ("mail", "edge")
    observations._probe_metrics(relay, {"mail/a": probed(PASS, PASS)})
    assert series() == {}  # a policy whose probes pass costs no series
    observations._probe_metrics(relay, {"mail/a": probed(FAIL, PASS), "mail/b": probed(FAIL)})
    observations._probe_metrics(edge, {"mail/a": probed(FAIL, FAIL)})
    assert series() == {"a": 2.0, "b": 1.0}
    observations._probe_metrics(edge, {})
    assert series() == {"a": 1.0, "b": 1.0}
    observations._probe_metrics(relay, {"mail/a": probed(PASS, PASS)})
    assert series() == {}


async def test_memory_is_handed_back_once_the_operator_is_quiet_after_work() -> None:
    ready = False
    trimmer = Trimmer(quiet=0.1, interval=60.0, ready=lambda: ready)
    for _ in range(20):  # a burst of events: no trim while they keep coming
        trimmer.work()
        await asyncio.sleep(0.02)
    assert trimmer.trims == 0
    await asyncio.sleep(0.4)  # quiet, but a render or a status write is still in flight
    assert trimmer.trims == 0
    ready = True
    trimmer.work()  # what the operator does when its last worker or status write ends
    await asyncio.sleep(0.4)
    assert trimmer.trims == 1
    await asyncio.sleep(0.3)  # no work since: nothing more to hand back
    assert trimmer.trims == 1
    trimmer.stop()


async def test_work_that_never_pauses_is_still_trimmed_now_and_then() -> None:
    trimmer = Trimmer(quiet=0.1, interval=0.3)
    for _ in range(60):  # 1.2 s of events every 20 ms: never a quiet spell
        trimmer.work()
        await asyncio.sleep(0.02)
    assert trimmer.trims >= 2
    trimmer.stop()
