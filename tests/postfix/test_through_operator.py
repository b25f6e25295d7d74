"""The whole operator against real Postfix: policy objects in the real kube-apiserver, pods
that are real Pod objects (made Running and Ready by kwok) backed by real local Postfix
instances, real mail to real sinks (DESIGN.md §3, §5, §7).

This is the code path of production with one seam swapped: the PodRunner is the local
runner, which runs the very same argv against the pod's local instance (exec through the
API server into kwok is proven in tests/cluster/test_exec_through_apiserver.py).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from mailtls_operator.crd import PLURAL
from mailtls_operator.render import REVISION_KEY
from testbed import LocalPodRunner, SmtpSink
from testbed.auditlog import AuditTail

from .conftest import PodFactory
from .operating import Kubectl, operator, poll, seed_pods

pytestmark = [pytest.mark.postfix, pytest.mark.cluster]


async def test_encrypt_defers_until_may_is_rolled_out_to_every_pod(
        make_pod: PodFactory, plain: SmtpSink, runner: LocalPodRunner,
        kubectl: Kubectl) -> None:
    routes = {"plain.example": f"smtp:{plain.nexthop}"}
    pods = await seed_pods(make_pod, kubectl, 2, routes=routes)
    async with operator(kubectl, runner):
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
            obj = kubectl.pod(pod.name)
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
        make_pod: PodFactory, plain: SmtpSink, runner: LocalPodRunner,
        kubectl: Kubectl) -> None:
    await seed_pods(make_pod, kubectl, 3)
    async with operator(kubectl, runner) as op:
        runner.calls.clear()  # the empty table rolled out at the start is not this test's
        await kubectl.apply("p", destinations=["a.example"], level="encrypt")
        await kubectl.until_ready("p")
        verified = [c.pod.name for c in runner.calls if c.argv[:3] == ("postmap", "-q", "-")]
        assert verified == ["relay-0", "relay-1", "relay-2"]
        # DESIGN.md §7: an unchanged transport table and lmdb: no pod is reloaded
        assert [c for c in runner.calls if c.argv[:1] == ("postfix",)] == []
        # one pod after the other: each pod's commands form one contiguous run (the reads
        # of the version lint and of the observer, which may follow at once, left aside)
        sequence = [c.pod.name for c in runner.calls
                    if c.argv[0] not in ("postconf", "postqueue")]
        runs = [name for i, name in enumerate(sequence) if i == 0 or sequence[i - 1] != name]
        assert runs == ["relay-0", "relay-1", "relay-2"]

        def rollout_calls() -> int:  # commands that change a pod (not the observer's reads)
            return sum(1 for c in runner.calls
                       if c.argv[0] in ("sh", "postmap", "mv", "cp", "rm", "postfix"))

        await poll(lambda: op.idle)
        before = rollout_calls()
        op_state = op.states[(kubectl.ns, "relay")]
        rollouts = op_state.rollouts
        version = await kubectl.apply("p", destinations=["a.example"], level="encrypt")  # same
        await poll(lambda: op.has_seen(kubectl.ns, "p", version) and op.idle)
        assert rollout_calls() == before
        assert op_state.rollouts == rollouts


async def test_a_failing_pod_stops_the_rollout_and_the_status_says_why(
        make_pod: PodFactory, runner: LocalPodRunner, kubectl: Kubectl) -> None:
    pods = await seed_pods(make_pod, kubectl, 2)
    async with operator(kubectl, runner, retry_base=0.5):
        await kubectl.apply("p", destinations=["a.example"], level="may")
        await kubectl.until_ready("p")
        old = pods[1][1].query(REVISION_KEY)
        pods[0][1].lock_map_dir()  # relay-0 goes first and cannot write its map directory
        try:
            await kubectl.apply("p", destinations=["a.example"], level="encrypt")
            failed = await kubectl.until_ready("p", reason="RolloutFailed")
            assert f"{kubectl.ns}/relay-0" in failed["message"]
            assert "0/2 pods" in failed["message"] or "1/2" not in failed["message"]
            assert pods[1][1].query(REVISION_KEY) == old  # untouched, still the old table
            assert pods[1][1].query("a.example") == "may"
            await poll(lambda: any(e.get("reason") == "RolloutFailed"
                                   for e in kubectl.events()))
        finally:
            pods[0][1].unlock_map_dir()
        await kubectl.until_ready("p", timeout=30)  # retried with backoff, then converged
        assert all(inst.query("a.example") == "encrypt" for _, inst in pods)


async def test_audit_probes_report_each_sink_and_write_nothing_until_enforced(
        make_pod: PodFactory, plain: SmtpSink, self_signed: SmtpSink, ca_signed: SmtpSink,
        ca: Any, runner: LocalPodRunner, kubectl: Kubectl) -> None:
    [(_, inst)] = await seed_pods(make_pod, kubectl, 1)
    async with operator(kubectl, runner, observe_interval=0):
        await kubectl.apply("plain", destinations=[plain.nexthop], level="encrypt",
                            mode="audit")
        await kubectl.apply("self-signed", destinations=[self_signed.nexthop], level="secure",
                            match=["sink.mailtls.test"], mode="audit")
        await kubectl.apply("wrong-name", destinations=[ca_signed.nexthop], level="secure",
                            match=["other.mailtls.test"], tafile=[str(ca.pem_path)],
                            mode="audit")
        await kubectl.apply("ca", destinations=[ca_signed.nexthop], level="secure",
                            match=["sink.mailtls.test"], tafile=[str(ca.pem_path)],
                            mode="audit")

        assert (await kubectl.first_probe("plain"))["reason"] == "NoStartTLS"
        assert (await kubectl.first_probe("self-signed"))["reason"] == "Untrusted"
        assert (await kubectl.first_probe("wrong-name"))["reason"] == "NameMismatch"
        passed = await kubectl.first_probe("ca")
        assert (passed["result"], passed["reason"], passed["instance"]) == (
            "Pass", "Verified", "relay")
        verified = next(c for c in kubectl.status("plain")["conditions"]
                        if c["type"] == "Verified")
        assert verified["status"] == "False" and "NoStartTLS" in verified["message"]
        cm = kubectl.configmap()
        assert cm is not None and plain.nexthop not in cm["data"]["tls_policy"]
        assert inst.query(ca_signed.nexthop) is None  # audit: never in any table

        await kubectl.apply("ca", destinations=[ca_signed.nexthop], level="secure",
                            match=["sink.mailtls.test"], tafile=[str(ca.pem_path)],
                            mode="enforce")
        await poll(lambda: inst.query(ca_signed.nexthop) is not None)
        assert inst.query(ca_signed.nexthop) == (
            f"secure match=sink.mailtls.test tafile={ca.pem_path}")


async def test_stuck_mail_is_reported_and_released_when_the_policy_is_fixed(
        make_pod: PodFactory, plain: SmtpSink, runner: LocalPodRunner,
        kubectl: Kubectl) -> None:
    routes = {"plain.example": f"smtp:{plain.nexthop}"}
    [(_, inst)] = await seed_pods(make_pod, kubectl, 1, routes=routes)
    retry = inst.postconf("minimal_backoff_time", "queue_run_delay")
    async with operator(kubectl, runner, observe_interval=0.3):
        await kubectl.apply("plain", destinations=[plain.nexthop], level="encrypt")
        await kubectl.until_ready("plain")
        qid = inst.submit(["user@plain.example"])
        await asyncio.to_thread(inst.wait_for_delivery, qid, status="deferred")

        def deferred() -> dict[str, Any] | None:
            d = kubectl.status("plain").get("deferred") or {}
            return d if d.get("recipients") else None
        report = await poll(deferred, 15)
        assert report["recipients"] == 1
        assert "TLS is required, but was not offered" in report["sampleReason"]
        assert report["keys"][0]["key"] == plain.nexthop
        assert report["byInstance"][0]["instance"] == "relay"

        loop = asyncio.get_running_loop()
        fixed = loop.time()
        await kubectl.apply("plain", destinations=[plain.nexthop], level="may")
        await poll(lambda: plain.messages, timeout=20)
        took = loop.time() - fixed
        # Postfix itself would retry only after minimal_backoff_time / queue_run_delay
        backoff = min(_seconds(retry["minimal_backoff_time"]),
                      _seconds(retry["queue_run_delay"]))
        assert backoff >= 300
        assert took < backoff / 10, (took, backoff)
        await poll(lambda: (kubectl.status("plain").get("deferred") or {})
                                   .get("recipients") == 0, 15)


def _seconds(value: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return float(value[:-1]) * units[value[-1]] if value[-1] in units else float(value)


async def test_lint_warns_dane_without_dnssec_and_holds_back_a_missing_tafile(
        make_pod: PodFactory, runner: LocalPodRunner, kubectl: Kubectl) -> None:
    [(_, inst)] = await seed_pods(make_pod, kubectl, 1)
    async with operator(kubectl, runner):
        await kubectl.apply("dane", destinations=["dane.example"], level="dane")
        await kubectl.apply("missing-ca", destinations=["partner.example"], level="secure",
                            match=["nexthop"], tafile=["/nonexistent/partner-ca.pem"])
        await kubectl.apply("fine", destinations=["fine.example"], level="encrypt")
        dane = await kubectl.until_ready("dane", reason="DNSSECDisabled")
        assert "smtp_dns_support_level" in dane["message"]
        held = await kubectl.until_ready("missing-ca", reason="TrustAnchorMissing")
        assert "/nonexistent/partner-ca.pem" in held["message"]
        await kubectl.until_ready("fine")
        assert inst.query("fine.example") == "encrypt"
        assert inst.query("dane.example") == "dane"
        assert inst.query("partner.example") is None  # held back from this instance only


class GatedRunner:
    """The local runner, but the verification (``postmap -q -``) in one pod waits for the
    test's go-ahead: a way to catch the operator mid-rollout (between two pods, the gated
    pod swapped but not yet verified nor annotated) deterministically."""

    def __init__(self, inner: LocalPodRunner, gated_pod: str) -> None:
        self.inner = inner
        self.gated_pod = gated_pod
        self.reached = threading.Event()
        self.go = threading.Event()

    async def run(self, pod: Any, argv: Any, *, stdin: bytes | None = None,
                  timeout: float = 60.0) -> Any:
        if pod.name == self.gated_pod and list(argv[:3]) == ["postmap", "-q", "-"] \
                and not self.go.is_set():
            self.reached.set()
            while not self.go.is_set():  # cancellable, as a real exec is
                await asyncio.sleep(0.02)
        return await self.inner.run(pod, argv, stdin=stdin, timeout=timeout)


async def test_an_operator_killed_mid_rollout_is_finished_by_the_next_one(
        make_pod: PodFactory, runner: LocalPodRunner, kubectl: Kubectl) -> None:
    pods = await seed_pods(make_pod, kubectl, 3)
    async with operator(kubectl, runner):
        await kubectl.apply("p", destinations=["a.example"], level="may")
        await kubectl.until_ready("p")
    old = kubectl.status("p")["instances"][0]["revision"]
    gated = GatedRunner(runner, "relay-1")
    try:
        async with operator(kubectl, gated):
            await kubectl.apply("p", destinations=["a.example"], level="encrypt")
            assert await asyncio.to_thread(gated.reached.wait, 15)
            assert pods[0][1].query("a.example") == "encrypt"
            assert pods[2][1].query("a.example") == "may"
            # offered as the rollout began, written once the pending grace has passed
            pending = await poll(lambda: (r := kubectl.ready("p")) and r["reason"] == "Pending"
                                 and r)
            assert "relay: 0/3 pods on revision" in pending["message"]
        # the operator is gone mid-rollout: relay-1 swapped, not verified; relay-2 untouched
    finally:
        gated.go.set()
    async with operator(kubectl, runner):
        await poll(lambda: kubectl.status("p")["instances"][0]["revision"] != old)
        ready = await kubectl.until_ready("p", timeout=30)
        assert "3/3 pods verified" in ready["message"]
        assert [inst.query("a.example") for _, inst in pods] == ["encrypt"] * 3


async def test_a_pod_deleted_mid_rollout_ends_in_a_truthful_status(
        make_pod: PodFactory, runner: LocalPodRunner, kubectl: Kubectl) -> None:
    pods = await seed_pods(make_pod, kubectl, 3)
    gated = GatedRunner(runner, "relay-1")
    # applied before the start: the operator's first rollout is this policy's (no empty
    # table first), and it stops at relay-1 before the operator could ever be idle
    await kubectl.apply("p", destinations=["a.example"], level="encrypt")
    async with operator(kubectl, gated, settle=False):
        assert await asyncio.to_thread(gated.reached.wait, 15)
        await asyncio.to_thread(kubectl.delete_pod, "relay-1")  # kwok finishes the deletion
        runner.remove(pods[1][0])
        pods[1][1].stop()
        gated.go.set()
        ready = await kubectl.until_ready("p", timeout=30)
        assert "2/2 pods verified" in ready["message"]
        assert [pods[i][1].query("a.example") for i in (0, 2)] == ["encrypt"] * 2
        status = kubectl.status("p")
        assert status["instances"][0]["podsTotal"] == 2


async def test_a_table_changed_by_hand_inside_a_pod_is_rolled_again_on_resync(
        make_pod: PodFactory, runner: LocalPodRunner, kubectl: Kubectl) -> None:
    [(_, inst)] = await seed_pods(make_pod, kubectl, 1)
    async with operator(kubectl, runner, resync_interval=0.5):
        await kubectl.apply("p", destinations=["a.example"], level="encrypt")
        await kubectl.until_ready("p")
        good = inst.query(REVISION_KEY)
        inst.map_path.write_text(f"{REVISION_KEY} secure match=rev-tampered\na.example none\n")
        inst.run(["postmap", f"lmdb:{inst.map_path}"])
        assert inst.query("a.example") == "none"
        await poll(lambda: inst.query("a.example") == "encrypt", timeout=10)
        assert inst.query(REVISION_KEY) == good


async def test_a_change_to_one_policy_leaves_the_others_status_alone(
        make_pod: PodFactory, runner: LocalPodRunner, kubectl: Kubectl,
        audit_tail: AuditTail) -> None:
    pods = await seed_pods(make_pod, kubectl, 2)
    async with operator(kubectl, runner) as op:
        for i in range(5):
            await kubectl.apply(f"p{i}", destinations=[f"d{i}.example"], level="encrypt")
        for i in range(5):
            await kubectl.until_ready(f"p{i}")
        await poll(lambda: op.idle)  # the last status write and its Event included
        before = kubectl.status("p1")

        def p1_events() -> int:
            return sum(1 for e in kubectl.events() if e["involvedObject"]["name"] == "p1")

        events = p1_events()
        since = await asyncio.to_thread(audit_tail.barrier)
        version = await kubectl.apply("p0", destinations=["d0.example"], level="may")
        await poll(lambda: kubectl.status("p0")["observedGeneration"] == 2)
        await kubectl.until_ready("p0")
        await poll(lambda: pods[1][1].query("d0.example") == "may")
        await poll(lambda: op.has_seen(kubectl.ns, "p0", version) and op.idle)
        patched = {r.name for r in kubectl.requests(audit_tail, "patch", PLURAL,
                                                    subresource="status", since=since)}
        assert patched == {"p0"}
        assert kubectl.status("p1") == before  # same revision, same time stamps
        assert p1_events() == events  # no Event either


async def test_a_restart_after_several_changes_rewrites_no_status(
        make_pod: PodFactory, runner: LocalPodRunner, kubectl: Kubectl,
        audit_tail: AuditTail) -> None:
    await seed_pods(make_pod, kubectl, 2)
    async with operator(kubectl, runner):
        for i in range(3):
            await kubectl.apply(f"p{i}", destinations=[f"d{i}.example"], level="encrypt")
            await kubectl.until_ready(f"p{i}")  # three revisions, each policy its own
    revisions = {kubectl.status(f"p{i}")["instances"][0]["revision"] for i in range(3)}
    assert len(revisions) == 3
    since = await asyncio.to_thread(audit_tail.barrier)
    async with operator(kubectl, runner) as op:
        versions = {f"p{i}": (kubectl.get(f"p{i}") or {})["metadata"]["resourceVersion"]
                    for i in range(3)}
        await poll(lambda: op.states and op.idle and all(
            op.has_seen(kubectl.ns, name, str(v)) for name, v in versions.items()))
    assert kubectl.count(audit_tail, "patch", PLURAL, subresource="status", since=since) == 0
    assert kubectl.count(audit_tail, ("create", "patch"), "configmaps", since=since) == 0


async def test_a_tafile_only_root_can_read_is_held_back_like_a_missing_one(
        make_pod: PodFactory, runner: LocalPodRunner, kubectl: Kubectl, ca_signed: SmtpSink,
        ca: Any, pods_dir: Any) -> None:
    """smtp(8) opens a tafile as user postfix: a Secret mounted 0400 defers all mail to the
    key ("client TLS configuration problem"), so the operator must not roll it out."""
    secret = pods_dir / "secret-ca.pem"
    secret.write_bytes(ca.pem_path.read_bytes())
    secret.chmod(0o400)
    [(_, inst)] = await seed_pods(make_pod, kubectl, 1)
    async with operator(kubectl, runner):
        await kubectl.apply("root-only", destinations=["root-only.example"], level="secure",
                            match=["nexthop"], tafile=[str(secret)])
        await kubectl.apply("readable", destinations=[ca_signed.nexthop], level="secure",
                            match=["sink.mailtls.test"], tafile=[str(ca.pem_path)])
        held = await kubectl.until_ready("root-only", reason="TrustAnchorMissing")
        assert "user postfix cannot read it" in held["message"]
        await kubectl.until_ready("readable")
        assert inst.query("root-only.example") is None
        assert inst.query(ca_signed.nexthop) is not None
