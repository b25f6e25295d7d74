"""A rolled-out policy really defers or delivers mail as its level says.

Each test renders MailTLSPolicy objects with the real model and renderer,
installs them with ``rollout.apply_to_pod`` through the local runner (the
same argv as in a pod), and sends real mail through real Postfix to loopback
sinks that record whether the session was encrypted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mailtls_operator import postfix
from mailtls_operator.rollout import PodStatus, apply_to_pod
from testbed import LocalCA, LocalPodRunner, SmtpSink

from .conftest import BOTH_VERSIONS, PodFactory
from .helpers import policy, raw_tables, tables, target

pytestmark = [pytest.mark.postfix, BOTH_VERSIONS]


def routes(*sinks: tuple[str, SmtpSink]) -> dict[str, str]:
    """The instance's own routing (its site transport table, not the operator's)."""
    return {domain: f"smtp:{sink.nexthop}" for domain, sink in sinks}


async def test_encrypt_defers_plain_sink_until_may_is_rolled_out(
        runner: LocalPodRunner, make_pod: PodFactory, plain: SmtpSink) -> None:
    pod, inst = make_pod("relay-0", routes=routes(("plain.test", plain)))
    strict = tables(policy("partner", "encrypt", [plain.nexthop]))
    assert (await apply_to_pod(runner, target(pod, inst), strict, timeout=10)).ok

    qid = inst.submit("user@plain.test")
    attempt = inst.wait_for_delivery(qid)
    assert attempt.status == "deferred"
    assert attempt.dsn == "4.7.4"
    assert attempt.reason.startswith("TLS is required, but was not offered by host")
    queued = {m["queue_id"]: m for m in inst.queue()}
    assert queued[qid]["queue_name"] == "deferred"
    assert queued[qid]["recipients"][0]["delay_reason"].startswith("TLS is required")
    assert plain.messages == []

    relaxed = tables(policy("partner", "may", [plain.nexthop]))
    out = await apply_to_pod(runner, target(pod, inst, strict.revision), relaxed, timeout=10)
    assert out.status is PodStatus.APPLIED, out
    # DESIGN.md §10: schedule the message that was deferred for this key, now.
    res = await runner.run(pod, postfix.postqueue_schedule(qid), timeout=10)
    assert res.ok, res.message()
    sent = inst.wait_for_delivery(qid, status="sent")
    assert sent.dsn == "2.0.0"
    [msg] = plain.wait_for(1)
    assert not msg.tls
    assert inst.queue() == []


async def test_encrypt_delivers_over_tls_to_self_signed_sink(
        runner: LocalPodRunner, make_pod: PodFactory, self_signed: SmtpSink) -> None:
    pod, inst = make_pod("relay-0", routes=routes(("tls.test", self_signed)))
    t = tables(policy("partner", "encrypt", [self_signed.nexthop]))
    assert (await apply_to_pod(runner, target(pod, inst), t, timeout=10)).ok

    qid = inst.submit("user@tls.test")
    assert inst.wait_for_delivery(qid).status == "sent"
    [msg] = self_signed.wait_for(1)
    assert msg.tls and msg.cipher
    inst.wait_for_log(rf"Untrusted TLS connection established to [^ ]*:{self_signed.port}:")


async def test_secure_defers_untrusted_and_delivers_with_tafile(
        runner: LocalPodRunner, make_pod: PodFactory, self_signed: SmtpSink,
        ca_signed: SmtpSink, ca: LocalCA) -> None:
    pod, inst = make_pod("relay-0", routes=routes(("self.test", self_signed),
                                                           ("ca.test", ca_signed)))
    t = tables(policy("self", "secure", [self_signed.nexthop], match=[self_signed.hostname]),
               policy("ca", "secure", [ca_signed.nexthop], match=[ca_signed.hostname],
                      tafile=[str(ca.pem_path)]))
    assert (await apply_to_pod(runner, target(pod, inst), t, timeout=10)).ok

    untrusted = inst.submit("user@self.test")
    attempt = inst.wait_for_delivery(untrusted)
    assert (attempt.status, attempt.dsn) == ("deferred", "4.7.5")
    assert "Server certificate not verified" in attempt.reason
    assert self_signed.messages == []

    verified = inst.submit("user@ca.test")
    attempt = inst.wait_for_delivery(verified)
    assert attempt.status == "sent", attempt.line
    [msg] = ca_signed.wait_for(1)
    assert msg.tls
    inst.wait_for_log(rf"Verified TLS connection established to [^ ]*:{ca_signed.port}:")


async def test_idn_destination_needs_both_labels(
        runner: LocalPodRunner, make_pod: PodFactory, plain: SmtpSink, tmp_path: Path) -> None:
    """SMTPUTF8 mail is looked up with the U-label, ASCII mail with the A-label."""
    hosts = {"bücher.example": "127.0.0.1", "xn--bcher-kva.example": "127.0.0.1"}
    pod, inst = make_pod("relay-0", hosts=hosts, smtp_tcp_port=plain.port)

    # Postfix's own behaviour, first: an A-label key alone (a hand-written table;
    # the model never writes one) lets SMTPUTF8 mail through in clear text.
    a_only = raw_tables("a" * 64, {"xn--bcher-kva.example": "encrypt"})
    assert (await apply_to_pod(runner, target(pod, inst), a_only, timeout=10)).ok
    leak = inst.submit("leak@bücher.example", smtputf8=True)
    attempt = inst.wait_for_delivery(leak)
    assert attempt.status == "sent", attempt.line
    [msg] = plain.wait_for(1)
    assert msg.smtputf8 and not msg.tls

    # The model emits both keys for an IDN destination; then both forms are protected.
    both = tables(policy("idn", "encrypt", ["xn--bcher-kva.example"]))
    assert {"bücher.example", "xn--bcher-kva.example"} <= set(both.tls_entries)
    out = await apply_to_pod(runner, target(pod, inst, a_only.revision), both, timeout=10)
    assert out.ok, out
    utf8 = inst.submit("user@bücher.example", smtputf8=True)
    ascii_ = inst.submit("user@xn--bcher-kva.example")
    for qid in (utf8, ascii_):
        attempt = inst.wait_for_delivery(qid)
        assert attempt.status == "deferred", attempt.line
        assert attempt.reason.startswith("TLS is required, but was not offered")
    assert len(plain.messages) == 1
