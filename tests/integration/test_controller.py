"""The real operator (Kopf + the official client) against the API server emulation.

These tests cover DESIGN.md §3, §4, §6 and the coalescing of §7 without pods
(instances named by policies): ConfigMap content, conflicts, refusals, bursts,
restarts, hand edits and the absence of status feedback loops.  Rollouts into
real Postfix pods are in tests/postfix/.
"""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
import kubernetes.client
import pytest

from mailtls_operator.controller import Config, Operator, build_registry
from mailtls_operator.kube import Kube
from mailtls_operator.render import REVISION_KEY
from testbed.apiserver import ApiServer
from tests.integration.helpers import (
    PLURAL,
    Cluster,
    NoPodsRunner,
    idle,
    operating,
    policy,
)

pytestmark = pytest.mark.integration


async def test_create_update_delete_give_exact_configmap_content(cluster: Cluster,
                                                                 run_operator: Any,
                                                                 kube_client: Any) -> None:
    async with operating(run_operator, kube_client):
        await cluster.apply(policy("example-com", destinations=["Example.com", ".example.com"],
                                   level="secure", match=["nexthop", "dot-nexthop"]))
        await cluster.apply(policy("partner", destinations=["bücher.example"], level="encrypt",
                                   protocols=">=TLSv1.2"))
        want = [".example.com secure match=nexthop:dot-nexthop",
                "bücher.example encrypt protocols=>=TLSv1.2",
                "example.com secure match=nexthop:dot-nexthop",
                "xn--bcher-kva.example encrypt protocols=>=TLSv1.2"]
        await cluster.until(lambda: cluster.table("mail", "relay") == want)
        cm = cluster.configmap("mail", "relay")
        assert cm is not None
        text = cm["data"]["tls_policy"]
        revision = cm["metadata"]["annotations"]["mailtls.io/revision"]
        assert f"# revision: {revision}\n" in text
        assert f"\n{REVISION_KEY} secure match=rev-{revision[:16]}\n" in text
        assert "# mail/example-com\n.example.com secure" in text
        assert cm["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "mailtls-operator",
                                            "mailtls.io/instance": "relay"}

        await cluster.apply(policy("partner", destinations=["bücher.example"], level="may"))
        await cluster.until(lambda: "bücher.example may" in (cluster.table("mail", "relay")
                                                              or []))
        await cluster.delete("mail", "example-com")
        await cluster.until(lambda: cluster.table("mail", "relay") == [
            "bücher.example may", "xn--bcher-kva.example may"])
        ready = await cluster.until(lambda: cluster.condition("mail", "partner", "Ready"))
        assert ready["reason"] in ("RolledOut", "Pending")

        await cluster.delete("mail", "partner")  # no pods and no policy: the instance is gone
        await cluster.until(lambda: cluster.configmap("mail", "relay") is None)


async def test_conflicts_resolve_per_namespace_and_instance_and_the_loser_is_told(
        cluster: Cluster, run_operator: Any, kube_client: Any) -> None:
    async with operating(run_operator, kube_client) as op:
        await cluster.apply(policy("weak", destinations=["a.example"], level="may"))
        await cluster.apply(policy("strong", destinations=["a.example"], level="encrypt"))
        await cluster.apply(policy("elsewhere", namespace="other", destinations=["a.example"],
                                   level="none"))
        await cluster.apply(policy("edge-only", destinations=["a.example"], level="none",
                                   instances=["edge"]))
        await cluster.until(lambda: cluster.table("mail", "relay") == ["a.example encrypt"])
        await cluster.until(lambda: cluster.table("other", "relay") == ["a.example none"])
        await cluster.until(lambda: cluster.table("mail", "edge") == ["a.example none"])
        accepted = await cluster.until(
            lambda: (c := cluster.condition("mail", "weak", "Accepted")) and
            c["status"] == "False" and c)
        assert accepted["reason"] == "Conflict"
        assert "mail/strong" in accepted["message"]
        await cluster.until(lambda: idle(op))
        for name in ("strong", "edge-only"):
            assert cluster.has("mail", name, "Accepted")["status"] == "True"
        assert cluster.has("other", "elsewhere", "Accepted")["status"] == "True"
        assert cluster.status("mail", "strong")["entries"] == ["a.example encrypt"]
        assert cluster.status("mail", "weak")["entries"] == []


async def test_invalid_policy_is_refused_with_status_and_event_and_the_table_is_kept(
        cluster: Cluster, apiserver: ApiServer, run_operator: Any, kube_client: Any) -> None:
    with pytest.raises(kubernetes.client.ApiException) as refused:  # the API server's gate
        await cluster.apply(policy("bad", destinations=["a.example"], level="encrypt",
                                   match=["nexthop"]))
    assert refused.value.status == 422
    assert "spec.match" in (refused.value.body or "")

    async with operating(run_operator, kube_client) as op:
        await cluster.apply(policy("partner", destinations=["a.example"], level="encrypt"))
        await cluster.until(lambda: cluster.table("mail", "relay") == ["a.example encrypt"])
        await cluster.until(lambda: idle(op))
        good = cluster.configmap("mail", "relay")
        before = cluster.cm_writes()
        # an older cluster without our CEL rules let this through: the operator must refuse it
        obj = apiserver.get_object(PLURAL, "mail", "partner")
        assert obj is not None
        obj["spec"] = {"destinations": ["a.example"], "level": "encrypt",
                       "tafile": ["/etc/ca.pem"], "instances": ["relay"]}
        obj["metadata"]["generation"] = 2
        apiserver.seed(PLURAL, obj)
        cond = await cluster.until(
            lambda: (c := cluster.condition("mail", "partner", "Accepted")) and
            c["reason"] == "Invalid" and c)
        assert "spec.tafile: tafile is only valid with level verify or secure" in cond["message"]
        ready = cluster.condition("mail", "partner", "Ready")
        assert ready is not None and ready["reason"] == "Invalid"
        assert "last good generation 1 stays" in ready["message"]
        await cluster.until(lambda: any(
            e.get("reason") == "Invalid" and e["involvedObject"]["name"] == "partner"
            for e in apiserver.list_objects("v1/events", "mail")))
        await cluster.until(lambda: idle(op))
        assert cluster.configmap("mail", "relay") == good
        assert cluster.cm_writes() == before


async def test_a_burst_of_1000_applies_causes_at_most_3_configmap_writes(
        cluster: Cluster, apiserver: ApiServer, run_operator: Any, kube_client: Any) -> None:
    async with operating(run_operator, kube_client, debounce=0.5, max_delay=5.0) as op:
        apiserver.reset_log()
        objs = [policy(f"p{i:04d}", destinations=[f"d{i}.example"],
                       level=("may", "encrypt")[i % 2]) for i in range(1000)]
        sem = asyncio.Semaphore(32)

        async def one(obj: dict[str, Any]) -> None:
            async with sem:
                await cluster.apply(obj)

        await asyncio.gather(*(one(o) for o in objs))
        await cluster.until(lambda: len(cluster.table("mail", "relay") or []) == 1000, 60)
        await cluster.until(lambda: idle(op), 60)
        writes = cluster.cm_writes()
        assert 1 <= writes <= 3, writes
        state = op.states[("mail", "relay")]
        assert state.renders <= 3


async def test_restart_with_existing_state_writes_nothing(
        cluster: Cluster, apiserver: ApiServer, run_operator: Any, kube_client: Any) -> None:
    async with operating(run_operator, kube_client) as op:
        for i in range(5):
            await cluster.apply(policy(f"p{i}", destinations=[f"d{i}.example"], level="encrypt"))
        await cluster.until(lambda: len(cluster.table("mail", "relay") or []) == 5)
        await cluster.until(lambda: idle(op) and all(
            cluster.condition("mail", f"p{i}", "Ready") for i in range(5)))
    apiserver.reset_log()
    async with operating(run_operator, kube_client) as op2:
        await cluster.until(lambda: idle(op2) and op2.states)
        await asyncio.sleep(0.5)  # a grace period in which a spurious write would show
        assert cluster.cm_writes() == 0
        assert apiserver.request_count("patch", PLURAL, subresource="status") == 0


async def test_configmap_deleted_or_edited_by_hand_is_restored(
        cluster: Cluster, run_operator: Any, kube_client: Any) -> None:
    async with operating(run_operator, kube_client) as op:
        await cluster.apply(policy("p", destinations=["a.example"], level="encrypt"))
        await cluster.until(lambda: cluster.table("mail", "relay") == ["a.example encrypt"])
        await cluster.until(lambda: idle(op))
        good = cluster.configmap("mail", "relay")
        assert good is not None
        await asyncio.to_thread(cluster.core.delete_namespaced_config_map, "relay-mailtls",
                                "mail")
        await cluster.until(lambda: cluster.table("mail", "relay") == ["a.example encrypt"])
        await asyncio.to_thread(
            cluster.core.patch_namespaced_config_map, "relay-mailtls", "mail",
            {"data": {"tls_policy": "a.example none\n"}},
            _content_type="application/merge-patch+json")
        await cluster.until(lambda: cluster.table("mail", "relay") == ["a.example encrypt"])
        restored = cluster.configmap("mail", "relay")
        assert restored is not None and restored["data"] == good["data"]


async def test_status_writes_do_not_feed_back(cluster: Cluster, apiserver: ApiServer,
                                              run_operator: Any, kube_client: Any) -> None:
    async with operating(run_operator, kube_client) as op:
        apiserver.reset_log()
        for i in range(10):
            await cluster.apply(policy(f"p{i}", destinations=[f"d{i}.example"], level="may"))
        await cluster.until(lambda: idle(op) and all(
            cluster.condition("mail", f"p{i}", "Ready") for i in range(10)))
        first = apiserver.request_count("patch", PLURAL, subresource="status")
        assert first <= 30  # about one status write per policy per convergence
        apiserver.reset_log()
        await asyncio.sleep(1.0)  # several debounce periods: a loop would show here
        assert apiserver.request_count("patch", PLURAL, subresource="status") == 0
        assert cluster.cm_writes() == 0
        status = cluster.status("mail", "p3")
        assert status["observedGeneration"] == 1
        assert [c["type"] for c in status["conditions"]][:2] == ["Ready", "Accepted"]
        assert status["instances"][0]["name"] == "relay"


async def test_an_exception_expires_by_itself_when_the_clock_passes_it(
        cluster: Cluster, run_operator: Any, kube_client: Any) -> None:
    clock = FakeClock(datetime(2026, 11, 25, tzinfo=UTC))
    op = Operator(Kube(kube_client), NoPodsRunner(),
                  Config(debounce=0.1, max_delay=1.0), clock=clock)
    async with run_operator(build_registry(), memo=kopf.Memo(operator=op)):
        await cluster.apply(policy("secure", destinations=["p.example"], level="secure",
                                   match=["nexthop"]))
        await cluster.apply(policy("break-glass", destinations=["p.example"], level="may",
                                   exception={"startsAt": "2026-11-20T00:00:00Z",
                                      "expiresAt": "2026-11-26T00:00:00Z",
                                              "reason": "INC-7 partner certificate expired"}))
        await cluster.until(lambda: cluster.table("mail", "relay") == ["p.example may"])
        over = await cluster.until(lambda: cluster.condition("mail", "secure", "Overridden"))
        assert "mail/break-glass" in over["message"]
        clock.advance(timedelta(days=1, seconds=1))
        op_loop_wake(op)
        await cluster.until(lambda: cluster.table("mail", "relay") == [
            "p.example secure match=nexthop"])
        expired = await cluster.until(
            lambda: (c := cluster.condition("mail", "break-glass", "Ready")) and
            c["reason"] == "Expired" and c)
        assert expired["status"] == "False"


class FakeClock:
    """A clock the test moves; the operator reads it from its own thread."""

    def __init__(self, now: datetime) -> None:
        self._now = now
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._now += delta


def op_loop_wake(op: Operator) -> None:
    """Wake every worker from the test thread, in the operator's own loop."""
    worker = next(iter(op.workers.values()))
    assert worker.task is not None
    worker.task.get_loop().call_soon_threadsafe(op.wake_all)


async def test_a_table_past_the_configmap_limit_is_split_and_shrinks_back(
        cluster: Cluster, apiserver: ApiServer, run_operator: Any, kube_client: Any) -> None:
    import hashlib

    from mailtls_operator.configmap import reassemble

    def dests(p: int) -> list[str]:  # hex names: gzip cannot shrink them much
        return [hashlib.sha256(f"{p}-{i}".encode()).hexdigest()[:48] + ".example"
                for i in range(1000)]

    async with operating(run_operator, kube_client, debounce=0.3, max_delay=10.0) as op:
        for p in range(40):
            await cluster.apply(policy(f"bulk-{p}", destinations=dests(p), level="encrypt"))

        def parts() -> list[dict[str, Any]]:
            return sorted((cm for cm in apiserver.list_objects("v1/configmaps", "mail")
                           if cm["metadata"]["name"].startswith("relay-mailtls")),
                          key=lambda cm: cm["metadata"]["name"])

        await cluster.until(lambda: idle(op) and len(parts()) > 1
                            and op.states[("mail", "relay")].tables is not None
                            and len(op.states[("mail", "relay")].tables.tls_entries) == 40001,
                            60)
        bodies = parts()
        assert all(len(json.dumps(b)) < 1024 * 1024 for b in bodies)
        text = reassemble(bodies)
        tables = op.states[("mail", "relay")].tables
        assert tables is not None and text == tables.tls_policy
        for p in range(1, 40):
            await cluster.delete("mail", f"bulk-{p}")
        await cluster.until(lambda: len(parts()) == 1 and len(cluster.table("mail", "relay")
                                                              or []) == 1000, 60)
