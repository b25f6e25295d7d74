"""Reading ``postqueue -j``, TLS deferral reasons, and which policy key governs a recipient.

The queue lines are verbatim Postfix 3.7.11 output from the postfix test suite's
instances (encrypt to a plain sink, secure to a self-signed one, a ``may``
line with ``tafile``, ``dane-only`` without DNSSEC, a protocol mismatch, a
closed port).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from mailtls_operator import mailqueue as mq
from mailtls_operator import routing
from mailtls_operator.podrunner import ExecResult, PodRef, PodRunnerError
from mailtls_operator.postfix import InvalidArgument
from mailtls_operator.render import REVISION_KEY
from mailtls_operator.routing import InstanceConfig

QUEUE = """\
{"queue_name": "deferred", "queue_id": "ECA1320C46B", "arrival_time": 1795578736, "message_size": 462, "forced_expire": false, "sender": "sender@mailtls.test", "recipients": [{"address": "user@plain.test", "delay_reason": "TLS is required, but was not offered by host 127.0.0.1[127.0.0.1]"}]}
{"queue_name": "deferred", "queue_id": "EF39C20C46E", "arrival_time": 1795578736, "message_size": 468, "forced_expire": false, "sender": "sender@mailtls.test", "recipients": [{"address": "user@daneonly.test", "delay_reason": "client TLS configuration problem"}]}
{"queue_name": "deferred", "queue_id": "EDBE320C46C", "arrival_time": 1795578736, "message_size": 456, "forced_expire": false, "sender": "sender@mailtls.test", "recipients": [{"address": "user@ss.test", "delay_reason": "Server certificate not verified"}]}
{"queue_name": "deferred", "queue_id": "F200D20C477", "arrival_time": 1795578730, "message_size": 448, "forced_expire": false, "sender": "sender@mailtls.test", "recipients": [{"address": "a@plain.test", "delay_reason": "TLS is required, but was not offered by host 127.0.0.1[127.0.0.1]"}, {"address": "b@ss.test", "delay_reason": "Server certificate not verified"}]}
{"queue_name": "deferred", "queue_id": "F150420C470", "arrival_time": 1795578736, "message_size": 460, "forced_expire": false, "sender": "sender@mailtls.test", "recipients": [{"address": "user@down.test", "delay_reason": "connect to 127.0.0.1[127.0.0.1]:1: Connection refused"}]}
{"queue_name": "deferred", "queue_id": "F0A4620C46F", "arrival_time": 1795578736, "message_size": 462, "forced_expire": false, "sender": "sender@mailtls.test", "recipients": [{"address": "user@proto.test", "delay_reason": "Cannot start TLS: handshake failure"}]}
{"queue_name": "hold", "queue_id": "A0A4620C46F", "arrival_time": 1795578000, "message_size": 462, "forced_expire": false, "sender": "sender@mailtls.test", "recipients": [{"address": "held@plain.test", "delay_reason": "TLS is required, but was not offered by host 127.0.0.1[127.0.0.1]"}]}
{"queue_name": "active", "queue_id": "B0A4620C46F", "arrival_time": 1795578737, "message_size": 462, "forced_expire": false, "sender": "", "recipients": [{"address": "new@plain.test"}]}
"""  # noqa: E501

PLAIN, SS, DANE, PROTO = ("[127.0.0.1]:44351", "[127.0.0.1]:34999", "[127.0.0.1]:48593",
                          "[127.0.0.1]:38507")
TRANSPORT = {"plain.test": f"smtp:{PLAIN}", "ss.test": f"smtp:{SS}",
             "daneonly.test": f"smtp:{DANE}", "proto.test": f"smtp:{PROTO}",
             "down.test": "smtp:[127.0.0.1]:1"}
KEYS = {PLAIN, SS, DANE, PROTO, REVISION_KEY}
DIRECT = InstanceConfig()


def test_parse_real_queue() -> None:
    records = mq.parse_queue(QUEUE)
    assert len(records) == 8
    first = records[0]
    assert first.queue_id == "ECA1320C46B" and first.queue_name == "deferred"
    assert first.arrival_time == datetime.fromtimestamp(1795578736, UTC)
    assert first.message_size == 462 and first.sender == "sender@mailtls.test"
    assert first.recipients[0].domain == "plain.test"
    assert records[3].recipients[1] == mq.Recipient("b@ss.test", "Server certificate not "
                                                                 "verified")
    assert records[7].recipients[0].delay_reason == ""
    assert mq.parse_queue("") == [] and mq.parse_queue("\n\n") == []


@pytest.mark.parametrize("bad", ['{"queue_id": "X"}', "not json", "[1, 2]",
                                 '{"queue_name": "deferred", "queue_id": "A", '
                                 '"arrival_time": "soon", "recipients": []}',
                                 '{"queue_name": "deferred", "queue_id": "A", '
                                 '"arrival_time": 1, "recipients": {"address": "x"}}'])
def test_parse_refuses_what_postfix_does_not_write(bad: str) -> None:
    with pytest.raises(mq.QueueFormatError, match="line 2"):
        mq.parse_queue(QUEUE.splitlines()[0] + "\n" + bad + "\n")


@pytest.mark.parametrize(("reason", "kind"), [
    ("TLS is required, but was not offered by host 127.0.0.1[127.0.0.1]", "NoStartTLS"),
    ("TLS is required, but host mx.example[192.0.2.1] refused to start TLS: 454 4.7.0 no",
     "NoStartTLS"),
    ("TLS is required, but our TLS engine is unavailable", "TLSUnavailable"),
    ("TLS is required, but unavailable", "TLSUnavailable"),
    ("Server certificate not verified", "Unverified"),
    ("Server certificate not trusted", "Untrusted"),
    ("Cannot start TLS: handshake failure", "HandshakeFailed"),
    ("client TLS configuration problem", "ConfigError"),
    ("TLSA lookup error for mx.example.org:25", "DANE"),
    ("no TLSA records found", "DANE"),
    ("non DNSSEC destination", "DANE"),
    ("delivery temporarily suspended: Cannot start TLS: handshake failure", "HandshakeFailed"),
    ("lost connection with mx.example[192.0.2.1] while receiving the STARTTLS response",
     "HandshakeFailed"),
    ("conversation with mx.example[192.0.2.1] timed out while receiving the STARTTLS response",
     "HandshakeFailed"),
    ("connect to 127.0.0.1[127.0.0.1]:1: Connection refused", None),
    ("delivery temporarily suspended: connect to 127.0.0.1[127.0.0.1]:1: Connection refused",
     None),
    ("host mx.example[192.0.2.1] said: 530 5.7.0 Must issue a STARTTLS command first", None),
    ("host mx.example[192.0.2.1] said: 450 Server certificate not verified (in reply to RCPT)",
     None),
    ("", None),
])
def test_tls_reasons(reason: str, kind: str | None) -> None:
    assert mq.tls_reason(reason) == kind
    assert mq.is_tls_reason(reason) is (kind is not None)


# -- routing -----------------------------------------------------------------------


def test_transport_route_decides_the_key() -> None:
    assert routing.governing_key("plain.test", KEYS, DIRECT, TRANSPORT) == PLAIN
    assert routing.governing_key("PLAIN.test.", KEYS, DIRECT, TRANSPORT) == PLAIN
    assert routing.governing_key("other.test", KEYS, DIRECT, TRANSPORT) is None


def test_domain_keys_follow_postfix_lookup_order() -> None:
    keys = {"example.com", ".example.com", ".com", "b.example.com"}
    assert routing.governing_key("example.com", keys, DIRECT) == "example.com"
    assert routing.governing_key("a.b.example.com", keys, DIRECT) == ".example.com"
    assert routing.governing_key("b.example.com", keys, DIRECT) == "b.example.com"
    assert routing.governing_key("x.org", keys, DIRECT) is None
    # the domain itself is not looked up as ".domain"
    assert routing.governing_key("sub.example", {".sub.example"}, DIRECT) is None
    assert routing.governing_key("a.sub.example", {".sub.example"}, DIRECT) == ".sub.example"
    assert routing.governing_key("x.com", {".com"}, DIRECT) == ".com"


def test_explicit_nexthops_match_only_verbatim() -> None:
    assert routing.policy_lookup("[127.0.0.1]:2525", {"[127.0.0.1]:2525"}) == "[127.0.0.1]:2525"
    assert routing.policy_lookup("[127.0.0.1]:2525", {"[127.0.0.1]", "127.0.0.1:2525"}) is None
    assert routing.policy_lookup("mx.example.com:587", {".example.com"}) is None
    assert routing.policy_lookup("[mx.example.com]", {".example.com", "mx.example.com"}) is None


def test_relayhost_trap() -> None:
    relay = InstanceConfig(relayhost="[smarthost.example]:587", transport_maps="lmdb:/t")
    keys = {"partner.example", "[smarthost.example]:587"}
    # no route: the next-hop is the relayhost, the domain key never governs
    assert routing.governing_key("partner.example", keys, relay) == "[smarthost.example]:587"
    assert routing.governing_key("partner.example", {"partner.example"}, relay) is None
    # route: direct (transport "smtp:" resets the next-hop to the recipient domain)
    routed = {"partner.example": "smtp:"}
    assert routing.governing_key("partner.example", keys, relay, routed) == "partner.example"
    # ":" keeps the default next-hop (the relayhost)
    assert routing.governing_key("partner.example", keys, relay,
                            {"partner.example": ":"}) == "[smarthost.example]:587"
    # parent-domain transport entry and wildcard
    assert routing.governing_key("a.partner.example", {"a.partner.example"}, relay,
                            {".partner.example": "smtp:"}) == "a.partner.example"
    assert routing.governing_key("x.example", {"[h]:25"}, relay, {"*": "smtp:[h]:25"}) == "[h]:25"
    # relay via default_transport with a next-hop
    dt = InstanceConfig(default_transport="smtp:[relay.example]")
    assert routing.governing_key("partner.example", {"[relay.example]"}, dt) == "[relay.example]"


def test_non_smtp_transports_have_no_tls_policy() -> None:
    for value in ("error:no mail", "discard:", "local:", "lmtp:unix:/run/lmtp"):
        assert routing.governing_key("x.example", {"x.example"}, DIRECT,
                                     {"x.example": value}) is None
    assert routing.governing_key("x.example", {"[h]:25"}, DIRECT,
                                 {"x.example": "relay:[h]:25"}) == "[h]:25"


# -- grouping and status ------------------------------------------------------------


def test_deferred_by_key() -> None:
    records = mq.parse_queue(QUEUE)
    got = mq.deferred_by_key(records, KEYS, DIRECT, TRANSPORT)
    assert list(got) == sorted([PLAIN, SS, DANE, PROTO])
    plain = got[PLAIN]
    assert plain.recipients == 2  # user@ and a@; held@ is on hold, new@ not deferred
    assert plain.queue_ids == ("ECA1320C46B", "F200D20C477")
    assert plain.oldest_arrival == datetime.fromtimestamp(1795578730, UTC)
    assert plain.sample_reason.startswith("TLS is required, but was not offered")
    assert got[SS].recipients == 2 and got[SS].messages == 2
    assert got[DANE].sample_reason == "client TLS configuration problem"
    # down.test is deferred, but not for TLS
    assert all("F150420C470" not in s.queue_ids for s in got.values())


def test_deferred_unmatched_bucket() -> None:
    records = mq.parse_queue(QUEUE)
    got = mq.deferred_by_key(records, {PLAIN}, DIRECT, TRANSPORT, include_unmatched=True)
    assert got[mq.UNMATCHED].recipients == 4  # ss.test x2, daneonly, proto
    assert mq.UNMATCHED not in mq.deferred_by_key(records, {PLAIN}, DIRECT, TRANSPORT)


def test_summarise_for_policy_and_merge() -> None:
    records = mq.parse_queue(QUEUE)
    pod_a = mq.deferred_by_key(records, KEYS, DIRECT, TRANSPORT)
    pod_b = mq.deferred_by_key(records[:1], KEYS, DIRECT, TRANSPORT)
    merged = mq.merge_deferred(pod_a, pod_b)
    assert merged[PLAIN].recipients == 3
    assert merged[PLAIN].queue_ids == ("ECA1320C46B", "F200D20C477")
    status = mq.summarise_for_policy([PLAIN, SS, "[127.0.0.1]:9"], merged,
                                     by_instance={"relay": pod_a, "edge": pod_b, "idle": {}})
    assert status == {
        "recipients": 5, "messages": 3, "oldest": "2026-11-25T03:52:10Z",
        "sampleReason": "TLS is required, but was not offered by host 127.0.0.1[127.0.0.1]",
        "keys": [{"key": PLAIN, "recipients": 3, "oldest": "2026-11-25T03:52:10Z"},
                 {"key": SS, "recipients": 2, "oldest": "2026-11-25T03:52:10Z"}],
        "byInstance": [{"instance": "edge", "recipients": 1, "oldest": "2026-11-25T03:52:16Z"},
                       {"instance": "relay", "recipients": 4,
                        "oldest": "2026-11-25T03:52:10Z"}],
    }
    assert mq.summarise_for_policy(["nothing.example"], merged) == {"recipients": 0}
    assert "byInstance" not in mq.summarise_for_policy([PLAIN], merged)
    assert mq.releasable_ids(merged, [PLAIN, DANE]) == ["ECA1320C46B", "EF39C20C46E",
                                                         "F200D20C477"]


# -- pods (injected runner) ------------------------------------------------------------


@dataclass
class FakeRunner:
    result: ExecResult = field(default_factory=lambda: ExecResult(0))
    fail_for: set[str] = field(default_factory=set)
    calls: list[tuple[str, ...]] = field(default_factory=list)

    async def run(self, pod: PodRef, argv: Sequence[str], *, stdin: bytes | None = None,
                  timeout: float = 60.0) -> ExecResult:
        self.calls.append(tuple(argv))
        if argv[-1] in self.fail_for:
            raise PodRunnerError("pod gone")
        return self.result


POD = PodRef("mail", "relay-0")


async def test_read_queue_and_its_failures() -> None:
    runner = FakeRunner(ExecResult(0, QUEUE.encode()))
    assert len(await mq.read_queue(runner, POD)) == 8
    assert runner.calls == [("postqueue", "-j")]
    broken = FakeRunner(ExecResult(69, b"", b"postqueue: fatal: Queue report unavailable - "
                                             b"mail system is down\n"))
    with pytest.raises(mq.QueueCommandError, match="mail system is down"):
        await mq.read_queue(broken, POD)


async def test_release_validates_every_id_first() -> None:
    runner = FakeRunner()
    with pytest.raises(InvalidArgument):
        await mq.release(runner, POD, ["ECA1320C46B", "-f"])
    assert runner.calls == []
    runner = FakeRunner(fail_for={"F200D20C477"})
    outs = await mq.release(runner, POD, ["F200D20C477", "ECA1320C46B", "ECA1320C46B"])
    assert [(o.queue_id, o.ok) for o in outs] == [("ECA1320C46B", True),
                                                  ("F200D20C477", False)]
    assert sorted(runner.calls) == [("postqueue", "-i", "ECA1320C46B"),
                                    ("postqueue", "-i", "F200D20C477")]
