"""A discovered MTA-STS ``enforce`` policy, rendered and rolled out, really holds in Postfix.

The policy is published in the loopback DNS + HTTPS world, discovered by the
operator's :class:`Discoverer`, turned into entries and rendered by the one
renderer, installed by ``apply_to_pod``; then real mail goes to a sink whose
CA-issued certificate (``mx.partner.example``) matches the MX pattern
``*.partner.example`` and is deferred for a domain whose pattern it does not
match.  Trust comes from ``smtp_tls_CAfile`` (a discovered line carries no
``tafile``: the partner's certificate is publicly trusted in real life).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailtls_operator.discovery.dns import Dns
from mailtls_operator.discovery.engine import Discoverer
from mailtls_operator.discovery.entries import entries
from mailtls_operator.discovery.fetch import ssl_context
from mailtls_operator.render import render
from mailtls_operator.rollout import TableSet, apply_to_pod
from testbed import LocalCA, LocalPodRunner, SmtpSink, starttls_sink
from testbed.stsworld import StsWorld

from .conftest import PodFactory
from .helpers import INSTANCE, target

pytestmark = pytest.mark.postfix

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def world() -> Iterator[StsWorld]:
    with StsWorld(["mta-sts.partner.example", "mta-sts.other.example"]) as w:
        w.publish_sts("partner.example", id="1", mx=["*.partner.example"])
        w.publish_sts("other.example", id="1", mx=["*.other.example"])
        yield w


async def test_discovered_enforce_delivers_on_match_and_defers_otherwise(
        runner: LocalPodRunner, make_pod: PodFactory, world: StsWorld, ca: LocalCA,
        sinks: Callable[[SmtpSink], SmtpSink], tmp_path: Path) -> None:
    sink = sinks(starttls_sink(tmp_path / "certs", name="mx", hostname="mx.partner.example",
                               ca=ca))
    discoverer = Discoverer(Dns(("127.0.0.1", world.dns_port), timeout=2.0),
                            ssl_context(world.ca_file), https_port=world.https_port)
    states = await discoverer.discover_all(["partner.example", "other.example"], NOW,
                                           ["mta-sts"])
    found = entries(states, namespace=INSTANCE[0], name="partners")
    tables = TableSet.of(render(found, instance=INSTANCE, now=NOW))
    assert tables.tls_entries["partner.example"] == \
        "secure match=.partner.example servername=hostname"

    hosts = {"partner.example": "127.0.0.1", "other.example": "127.0.0.1"}
    pod, inst = make_pod("relay-0", hosts=hosts, smtp_tcp_port=sink.port,
                         extra_main_cf={"smtp_tls_CAfile": str(ca.pem_path)})
    assert (await apply_to_pod(runner, target(pod, inst), tables, timeout=10)).ok

    good = inst.submit("user@partner.example")
    attempt = inst.wait_for_delivery(good)
    assert attempt.status == "sent", attempt.line
    [msg] = sink.wait_for(1)
    assert msg.tls
    inst.wait_for_log(rf"Verified TLS connection established to [^ ]*:{sink.port}:")

    bad = inst.submit("user@other.example")
    attempt = inst.wait_for_delivery(bad)
    assert (attempt.status, attempt.dsn) == ("deferred", "4.7.5"), attempt.line
    assert "Server certificate not verified" in attempt.reason
    assert len(sink.messages) == 1
