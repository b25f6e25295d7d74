"""Stuck mail against real Postfix: seen in the queue, attributed to its key, released.

``postqueue -j`` is read through the pod runner; the governing key is found
with the instance's own routing (read with ``postconf``); after the policy is
relaxed by a real rollout, ``postqueue -i`` delivers the stuck mail at once
rather than at the next queue run (``queue_run_delay``, 300 s by default).
"""

from __future__ import annotations

import pytest

from mailtls_operator import mailqueue as mq
from mailtls_operator import postfix
from mailtls_operator.facts import read_instance_config
from mailtls_operator.rollout import PodStatus, apply_to_pod
from testbed import LocalPodRunner, SmtpSink, free_port

from .conftest import BOTH_VERSIONS, PodFactory
from .helpers import policy, tables, target

pytestmark = [pytest.mark.postfix, BOTH_VERSIONS]


async def test_tls_deferral_is_attributed_to_its_key_and_released(
        runner: LocalPodRunner, make_pod: PodFactory, plain: SmtpSink) -> None:
    closed = f"[127.0.0.1]:{free_port()}"
    routes = {"plain.test": f"smtp:{plain.nexthop}", "down.test": f"smtp:{closed}"}
    pod, inst = make_pod("relay-0", routes=routes)
    strict = tables(policy("partner", "encrypt", [plain.nexthop]),
                    policy("down", "may", [closed]))
    assert (await apply_to_pod(runner, target(pod, inst), strict, timeout=10)).ok

    stuck = [inst.submit("a@plain.test"), inst.submit(["b@plain.test", "c@plain.test"])]
    unrelated = inst.submit("user@down.test")
    for qid in (*stuck, unrelated):
        assert inst.wait_for_delivery(qid, timeout=15).status == "deferred"

    records = await mq.read_queue(runner, pod)
    assert {r.queue_id for r in records} == {*stuck, unrelated}
    config = await read_instance_config(runner, pod)
    deferred = mq.deferred_by_key(records, strict.tls_entries, config, routes,
                                  include_unmatched=True)
    assert list(deferred) == [plain.nexthop]  # down.test is deferred, not for TLS
    summary = deferred[plain.nexthop]
    assert summary.recipients == 3 and summary.queue_ids == tuple(sorted(stuck))
    assert mq.tls_reason(summary.sample_reason) == "NoStartTLS"
    assert summary.sample_reason == "TLS is required, but was not offered by host " \
                                    "127.0.0.1[127.0.0.1]"
    status = mq.summarise_for_policy(["x.example", plain.nexthop], deferred)
    assert status["recipients"] == 3 and status["messages"] == 2

    relaxed = tables(policy("partner", "may", [plain.nexthop]), policy("down", "may", [closed]))
    out = await apply_to_pod(runner, target(pod, inst, strict.revision), relaxed, timeout=10)
    assert out.status is PodStatus.APPLIED, out
    changed = [k for k in relaxed.tls_entries
               if relaxed.tls_entries[k] != strict.tls_entries.get(k)]
    ids = mq.releasable_ids(deferred, changed)
    assert ids == sorted(stuck)

    released = await mq.release(runner, pod, ids)
    assert all(r.ok for r in released), released
    msgs = plain.wait_for(2, timeout=5)  # bench/stuck_mail.py measures how fast
    assert sorted(r for m in msgs for r in m.rcpt_tos) == ["a@plain.test", "b@plain.test",
                                                           "c@plain.test"]
    assert not any(m.tls for m in msgs)
    # Postfix would otherwise have waited for its next queue run
    assert inst.postconf("queue_run_delay")["queue_run_delay"] == "300s"
    remaining = await mq.read_queue(runner, pod)
    assert [r.queue_id for r in remaining] == [unrelated]
    assert mq.deferred_by_key(remaining, relaxed.tls_entries, config, routes) == {}


async def test_relayhost_next_hop_governs_not_the_recipient_domain(
        runner: LocalPodRunner, make_pod: PodFactory, plain: SmtpSink) -> None:
    """The relayhost trap, seen from the queue: the relay's key deferred the mail."""
    pod, inst = make_pod("relay-0", relayhost=plain.nexthop)
    t = tables(policy("relay", "encrypt", [plain.nexthop]),
               policy("partner", "secure", ["partner.test"]))
    assert (await apply_to_pod(runner, target(pod, inst), t, timeout=10)).ok
    qid = inst.submit("user@partner.test")
    assert inst.wait_for_delivery(qid, timeout=15).status == "deferred"

    config = await read_instance_config(runner, pod)
    assert config.relay_nexthops == (plain.nexthop,)
    deferred = mq.deferred_by_key(await mq.read_queue(runner, pod), t.tls_entries, config)
    assert list(deferred) == [plain.nexthop]
    assert mq.summarise_for_policy(["partner.test"], deferred) == {"recipients": 0}


async def test_release_refuses_bad_ids_and_survives_vanished_ones(
        runner: LocalPodRunner, make_pod: PodFactory) -> None:
    pod, _ = make_pod("relay-0")
    before = len(runner.calls)
    with pytest.raises(postfix.InvalidArgument):
        await mq.release(runner, pod, ["ABCDEF123", "-f"])
    assert len(runner.calls) == before
    # postqueue -i exits 0 for an id that is no longer queued (delivered meanwhile)
    [out] = await mq.release(runner, pod, ["ABCDEF123"])
    assert out.ok
