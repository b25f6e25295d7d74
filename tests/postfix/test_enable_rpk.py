"""``enableRPK`` end to end: rendered as ``enable_rpk=yes``, compiled by the real ``postmap``,
delivered by Postfix 3.10 at ``may`` and ``encrypt``; refused by 3.7 ("invalid attribute
name", the mail deferred) and therefore held back from 3.7 instances by the operator."""

from __future__ import annotations

import pytest

from mailtls_operator import probe
from mailtls_operator.rollout import apply_to_pod
from testbed import LocalPodRunner, SmtpSink

from .conftest import BOTH_VERSIONS, PodFactory
from .helpers import policy, tables, target
from .operating import Kubectl, operator, seed_pods

pytestmark = [pytest.mark.postfix, BOTH_VERSIONS]


async def test_enable_rpk_is_delivered_by_310_and_deferred_by_37(
        runner: LocalPodRunner, make_pod: PodFactory, plain: SmtpSink,
        self_signed: SmtpSink, postfix_version: str) -> None:
    routes = {"may.test": f"smtp:{plain.nexthop}", "encrypt.test": f"smtp:{self_signed.nexthop}"}
    pod, inst = make_pod("relay-0", routes=routes)
    t = tables(policy("may", "may", [plain.nexthop], enableRPK=True),
               policy("encrypt", "encrypt", [self_signed.nexthop], enableRPK=True))
    assert t.tls_entries[self_signed.nexthop] == "encrypt enable_rpk=yes"
    assert (await apply_to_pod(runner, target(pod, inst), t, timeout=10)).ok
    assert inst.query(plain.nexthop) == "may enable_rpk=yes"  # postmap took the line

    sent = {d: inst.submit(f"user@{d}") for d in ("may.test", "encrypt.test")}
    attempts = {d: inst.wait_for_delivery(q) for d, q in sent.items()}
    if postfix_version == "3.10":
        assert {d: a.status for d, a in attempts.items()} == {
            "may.test": "sent", "encrypt.test": "sent"}, attempts
        [msg] = self_signed.wait_for(1)
        assert msg.tls
        [clear] = plain.wait_for(1)
        assert not clear.tls
    else:
        for attempt in attempts.values():
            assert (attempt.status, attempt.dsn) == ("deferred", "4.7.5"), attempt.line
        inst.wait_for_log(r'invalid attribute name: "enable_rpk"')
        assert plain.messages == [] and self_signed.messages == []


@pytest.mark.cluster
async def test_the_operator_holds_enable_rpk_back_from_37_only(
        make_pod: PodFactory, runner: LocalPodRunner, kubectl: Kubectl,
        postfix_version: str) -> None:
    [(_, inst)] = await seed_pods(make_pod, kubectl, 1)
    async with operator(kubectl, runner):
        await kubectl.apply("rpk", destinations=["rpk.example"], level="encrypt",
                            enableRPK=True)
        await kubectl.apply("fine", destinations=["fine.example"], level="encrypt")
        await kubectl.until_ready("fine")
        assert inst.query("fine.example") == "encrypt"
        if postfix_version == "3.10":
            await kubectl.until_ready("rpk")
            assert inst.query("rpk.example") == "encrypt enable_rpk=yes"
        else:
            held = await kubectl.until_ready("rpk", reason="UnsupportedAttribute")
            assert "enable_rpk needs Postfix 3.9" in held["message"]
            assert "runs 3.7.11" in held["message"]
            assert inst.query("rpk.example") is None


async def test_an_enable_rpk_policy_is_probed_like_any_other(
        runner: LocalPodRunner, make_pod: PodFactory, plain: SmtpSink,
        self_signed: SmtpSink) -> None:
    """The probe reads ``enable_rpk`` as Postfix does; it does not change the verdict."""
    pod, _ = make_pod("relay-0")
    p = policy("rpk", "encrypt", [plain.nexthop, self_signed.nexthop], enableRPK=True)
    outs = await probe.probe_policy(runner, pod, p, concurrency=2,
                                    timeouts=probe.ProbeTimeouts(connect=5, command=5))
    assert [(o.result, o.reason) for o in outs] == [("Fail", "NoStartTLS"),
                                                    ("Pass", "Encrypted")]
