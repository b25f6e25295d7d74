"""``rollout.roll_out`` on several real Postfix pods: one at a time, verified, stops on failure.

The pods are local Postfix instances behind ``LocalPodRunner``; the argv is
what production sends through the exec API.  The old table of a pod that was
not (or not successfully) updated is checked with ``postmap -q`` on its live
database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

import pytest

from mailtls_operator import postfix
from mailtls_operator.podrunner import ExecResult, PodRef
from mailtls_operator.rollout import (
    PodStatus,
    PodTarget,
    Step,
    TableSet,
    apply_to_pod,
    roll_out,
)
from testbed import LocalInstance, LocalPodRunner, SmtpSink

from .conftest import PodFactory
from .helpers import live_revision, policy, raw_tables, tables, target

pytestmark = pytest.mark.postfix

OLD = tables(policy("partner", "encrypt", ["old.example", "[192.0.2.1]:25"]))
NEW = tables(policy("partner", "secure", ["new.example", ".new.example"], match=["nexthop"]),
             policy("other", "may", ["other.example"], route="direct"))


async def install(runner: LocalPodRunner, pods: Sequence[tuple[PodRef, LocalInstance]],
                  t: TableSet) -> list[PodTarget]:
    """Bring ``pods`` to ``t`` and return their targets as the controller would see them."""
    out = await roll_out(runner, [target(p, i) for p, i in pods], t)
    assert out.ok, out.message()
    return [target(p, i, t.revision) for p, i in pods]


async def test_change_reaches_every_pod_one_at_a_time_and_verified(
        runner: LocalPodRunner, make_pod: PodFactory) -> None:
    pods = [make_pod(f"relay-{n}") for n in (2, 0, 1)]
    targets = await install(runner, pods, OLD)
    runner.calls.clear()

    done: list[tuple[str, str | None]] = []

    async def on_pod_done(t: PodTarget) -> None:
        # Called only after verification: the live table already answers NEW.
        done.append((t.pod.name, live_revision(runner.instance(t.pod))))

    out = await roll_out(runner, targets, NEW, on_pod_done=on_pod_done)
    assert out.ok and (out.updated, out.total) == (3, 3), out.message()
    assert [o.status for o in out.outcomes] == [PodStatus.APPLIED] * 3
    assert done == [(f"relay-{n}", NEW.revision_value) for n in (0, 1, 2)]

    # One at a time: every command of a pod ran before the next pod's first.
    order = [c.pod.name for c in runner.calls]
    assert order == sorted(order)
    assert all(c.returncode == 0 for c in runner.calls if c.argv[0] != "rm")
    for _, inst in pods:
        assert inst.query("new.example") == "secure match=nexthop"
        assert inst.query(".new.example") == "secure match=nexthop"
        assert inst.query("old.example") is None
        assert inst.query("other.example", table="transport") == "smtp:other.example"

    # Applying the same revision again is a no-op: not a single command.
    runner.calls.clear()
    again = await roll_out(runner, [target(p, i, NEW.revision) for p, i in pods], NEW,
                           on_pod_done=on_pod_done)
    assert again.ok and [o.status for o in again.outcomes] == [PodStatus.UNCHANGED] * 3
    assert runner.calls == []
    assert len(done) == 3


async def test_failed_postmap_stops_the_rollout_and_quotes_postfix(
        runner: LocalPodRunner, make_pod: PodFactory) -> None:
    """relay-1's image lacks postfix-cdb: its postmap fails, relay-2 is never touched."""
    pods = [make_pod("relay-0", map_type="cdb"),
            make_pod("relay-1", map_type="lmdb", missing_map_types=("cdb",)),
            make_pod("relay-2", map_type="cdb")]
    await install(runner, [pods[0], pods[2]], OLD)
    targets = [target(p, i, OLD.revision) for p, i in pods]
    targets[1] = PodTarget(pods[1][0], map_path=str(pods[1][1].map_path), map_type="cdb",
                           configmap_dir=str(pods[1][1].configmap_dir))
    runner.calls.clear()

    out = await roll_out(runner, targets, NEW)
    assert not out.ok
    assert (out.updated, out.total) == (1, 3)
    failure = out.failure
    assert failure is not None and failure.pod == pods[1][0]
    assert (failure.status, failure.step) == (PodStatus.FAILED, Step.POSTMAP)
    assert failure.message == ("postmap: fatal: unsupported dictionary type: cdb. "
                               "Is the postfix-cdb package installed?")
    assert out.untouched == (pods[2][0],)
    assert "relay-1: failed at postmap: postmap: fatal: unsupported" in out.message()

    assert live_revision(pods[0][1]) == NEW.revision_value
    assert live_revision(pods[2][1]) == OLD.revision_value
    assert pods[2][1].query("old.example") == "encrypt"
    assert runner.calls_for(pods[2][0]) == []
    # Nothing staged is left behind in the failed pod, and nothing was swapped there.
    assert not any(c.argv[0] == "mv" for c in runner.calls_for(pods[1][0]))
    assert sorted(p.name for p in pods[1][1].map_dir.iterdir()) == [
        "tls_policy", "tls_policy.lmdb", "transport", "transport.lmdb"]


async def test_unwritable_map_dir_stops_the_rollout(
        runner: LocalPodRunner, make_pod: PodFactory) -> None:
    pods = [make_pod(f"relay-{n}") for n in range(3)]
    targets = await install(runner, pods, OLD)
    try:
        pods[1][1].lock_map_dir()  # chattr +i: read-only even for root
    except Exception as exc:
        pytest.skip(f"cannot make a directory immutable here: {exc}")
    out = await roll_out(runner, targets, NEW)
    failure = out.failure
    assert failure is not None and failure.pod == pods[1][0]
    assert failure.step is Step.WRITE
    assert "tls_policy.mailtls-new: Operation not permitted" in failure.message
    assert out.untouched == (pods[2][0],)
    for _, inst in pods[1:]:
        assert live_revision(inst) == OLD.revision_value
    assert live_revision(pods[0][1]) == NEW.revision_value

    pods[1][1].unlock_map_dir()  # the volume is fixed: the retry converges
    retry = await roll_out(runner, [replace(targets[0], applied_revision=NEW.revision),
                                    *targets[1:]], NEW)
    assert retry.ok, retry.message()
    assert retry.outcomes[0].status is PodStatus.UNCHANGED


async def test_pod_gone_is_a_failure_not_an_exception(
        runner: LocalPodRunner, make_pod: PodFactory) -> None:
    pods = [make_pod(f"relay-{n}") for n in range(2)]
    runner.remove(pods[0][0])
    out = await roll_out(runner, [target(p, i) for p, i in pods], NEW)
    failure = out.failure
    assert failure is not None and failure.pod == pods[0][0]
    assert failure.step is Step.WRITE
    assert failure.message == 'pods "relay-0" not found in namespace "mail"'
    assert out.untouched == (pods[1][0],)


async def test_verification_catches_a_table_that_says_something_else(
        runner: LocalPodRunner, make_pod: PodFactory) -> None:
    """The verify step compares with the rendered values, not with what was written."""
    pod, inst = make_pod("relay-0")
    good = raw_tables("b" * 64, {"x.example": "encrypt"})
    lying = TableSet(good.revision, good.tls_policy, None,
                     {**good.tls_entries, "x.example": "secure"})
    out = await apply_to_pod(runner, target(pod, inst), lying, timeout=10)
    assert (out.status, out.step) == (PodStatus.FAILED, Step.VERIFY)
    assert "x.example -> 'encrypt', expected 'secure'" in out.message


async def test_parallelism_bounds_pods_in_flight(
        runner: LocalPodRunner, make_pod: PodFactory) -> None:
    pods = [make_pod(f"relay-{n}") for n in range(4)]
    in_flight: set[PodRef] = set()
    peak = 0

    class Counting:
        async def run(self, pod: PodRef, argv: Sequence[str], *, stdin: bytes | None = None,
                      timeout: float = 60.0) -> ExecResult:
            nonlocal peak
            in_flight.add(pod)
            peak = max(peak, len(in_flight))
            try:
                await asyncio.sleep(0.005)  # let the other workers get going
                return await runner.run(pod, argv, stdin=stdin, timeout=timeout)
            finally:
                if argv[:1] == ["postmap"] and argv[1:2] == ["-q"]:
                    in_flight.discard(pod)  # verify is the last step

    out = await roll_out(Counting(), [target(p, i) for p, i in pods], NEW, parallelism=2)
    assert out.ok, out.message()
    assert peak == 2


@pytest.mark.parametrize("map_type", ["lmdb", "cdb", "hash", "texthash"])
async def test_every_map_type_is_applied_and_verified(
        runner: LocalPodRunner, make_pod: PodFactory, map_type: str) -> None:
    pod, inst = make_pod("relay-0", map_type=map_type)
    applied = None
    if map_type != "texthash":  # texthash: every read of a fresh file costs Postfix ~1.5 s
        first = await apply_to_pod(runner, target(pod, inst), OLD, timeout=10)
        assert first.ok, first
        applied = OLD.revision
    out = await apply_to_pod(runner, target(pod, inst, applied), NEW, timeout=10)
    assert out.ok, out
    assert live_revision(inst) == NEW.revision_value
    assert inst.postconf("smtp_tls_policy_maps")["smtp_tls_policy_maps"] == (
        f"{map_type}:{inst.map_path}")
    names = sorted(p.name for p in inst.map_dir.iterdir())
    suffix = postfix.db_suffix(map_type)
    assert names == sorted({"tls_policy", f"tls_policy{suffix}", "transport",
                            f"transport{suffix}"})
    reloads = [c for c in runner.calls if c.argv[-1] == "reload"]
    # DESIGN.md §7: a reload for texthash (read once per process; one rollout here) or a
    # changed transport table (NEW adds a route): one either way, none for OLD on lmdb
    assert OLD.transport != NEW.transport
    assert len(reloads) == 1


async def test_a_tls_policy_change_of_an_indexed_table_is_live_without_a_reload(
        runner: LocalPodRunner, make_pod: PodFactory, plain: SmtpSink) -> None:
    """The smtp client re-opens the renamed lmdb table by itself: mail that encrypt
    deferred goes out in clear text under may, with no ``postfix reload`` run."""
    pod, inst = make_pod("relay-0", routes={"plain.test": f"smtp:{plain.nexthop}"})
    strict = tables(policy("partner", "encrypt", [plain.nexthop]))
    assert (await apply_to_pod(runner, target(pod, inst), strict, timeout=10)).ok
    qid = inst.submit("user@plain.test")
    assert inst.wait_for_delivery(qid).status == "deferred"
    runner.calls.clear()
    relaxed = tables(policy("partner", "may", [plain.nexthop]))
    out = await apply_to_pod(runner, target(pod, inst, strict.revision), relaxed, timeout=10)
    assert out.status is PodStatus.APPLIED and "reload" not in out.timings, out
    assert all(c.argv[:1] != ("postfix",) for c in runner.calls)
    assert (await runner.run(pod, postfix.postqueue_schedule(qid), timeout=10)).ok
    assert inst.wait_for_delivery(qid, status="sent").dsn == "2.0.0"
    [msg] = plain.wait_for(1)
    assert not msg.tls


async def test_a_pod_can_ask_for_a_reload_of_an_indexed_table(
        runner: LocalPodRunner, make_pod: PodFactory) -> None:
    pod, inst = make_pod("relay-0")
    out = await apply_to_pod(runner, target(pod, inst, reload=True), NEW, timeout=10)
    assert out.ok and "reload" in out.timings, out
    assert [c.argv[-1] for c in runner.calls].count("reload") == 1


async def test_stdin_less_transport_stages_from_the_mounted_configmap(
        runner: LocalPodRunner, make_pod: PodFactory) -> None:
    """Over v4.channel.k8s.io stdin never closes: cp from the ConfigMap once synced."""
    pod, inst = make_pod("relay-0")
    runner.stdin_supported = False
    inst.publish_configmap(OLD.tls_policy, OLD.transport)  # the kubelet is behind

    waiting = await apply_to_pod(runner, target(pod, inst), NEW, timeout=10)
    assert (waiting.status, waiting.step) == (PodStatus.WAITING, Step.WRITE)
    assert "waiting for the kubelet" in waiting.message and waiting.retryable
    assert "cannot close stdin" in " ".join(waiting.notes)
    assert live_revision(inst) is None  # the pod's initial (empty) table is still live

    inst.publish_configmap(NEW.tls_policy, NEW.transport)
    out = await apply_to_pod(runner, target(pod, inst), NEW, timeout=10)
    assert out.status is PodStatus.APPLIED, out
    assert live_revision(inst) == NEW.revision_value
    assert inst.query("other.example", table="transport") == "smtp:other.example"
    assert all(c.stdin_bytes is None for c in runner.calls if c.returncode is not None)
