"""What Postfix 3.10 emits through TLSRPT, measured on the real thing (see docs/tlsrpt.md).

One instance of Debian trixie's Postfix 3.10.13 (libtlsrpt 0.5.0rc1) with
``smtp_tlsrpt_enable = yes`` delivers to loopback sinks through a loopback DNS
server on port 53; the test binds the unix datagram socket Postfix sends to
and keeps every datagram.  Each test below asserts one measured fact, so the
design of issue 26 stands on tested behaviour, not on the README:

- a datagram (and a ``TLSRPT: status=...`` log line) per TLS session attempt
  *only* towards a next-hop domain that publishes ``_smtp._tls.<domain>``;
  nothing for other domains, for IP-literal next-hops, for ``may`` to a server
  without STARTTLS, and nothing at all while the global
  ``smtp_tls_security_level`` is empty/none, whatever the policy table says;
- the failure codes: no STARTTLS under ``encrypt`` 201, a self-signed
  certificate under ``secure`` 205 (validation-failure, reason
  ``self-signed_certificate``; not 203), a name mismatch under ``secure`` 202,
  an expired certificate under ``secure`` 204;
  success under ``may``/``encrypt``/``secure`` carries no failure details;
- (the real collector: test_tlsrpt_collector.py).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from testbed import Delivery, stop_all
from testbed.tlsrptworld import DatagramTrap

from .tlsrpt_helpers import SOCKET_NAME, World, instance, record, send_all, tlsrpt_world

__all__ = ["tlsrpt_world"]  # the fixture, re-used

FAILURE_NAMES = {201: "starttls-not-supported", 202: "certificate-host-mismatch",
                 203: "certificate-not-trusted", 204: "certificate-expired",
                 205: "validation-failure"}
_LOG_RE = re.compile(
    r"TLSRPT: status=(?P<status>\w+), domain=(?P<domain>[^,]+), "
    r"receiving_mx=(?P<mx>[^\[]+)\[(?P<ip>[^\]]+)\]"
    r"(?:, failure_type=(?P<type>\w+))?(?:, failure_reason=(?P<reason>\S+))?$")


@dataclass
class Run:
    """One instance's deliveries, the datagrams Postfix sent, its log, the names it asked."""

    deliveries: dict[str, Delivery]
    raw: list[bytes]
    by_domain: dict[str, dict[str, Any]]
    log_lines: dict[str, re.Match[str]]
    asked: list[str]


CASES: dict[str, tuple[str, str, bool]] = {
    "nostarttls.test": ("plain", "encrypt", True),
    "selfsigned.test": ("self-signed", "secure", True),
    "mismatch.test": ("ca-signed", "secure match=other.name", True),
    "may.test": ("self-signed", "may", True),
    "encrypt.test": ("self-signed", "encrypt", True),
    "secure.test": ("ca-signed", "secure match=sink.mailtls.test", True),
    "expired.test": ("expired", "secure match=sink.mailtls.test", True),
    "mayplain.test": ("plain", "may", True),
    "silent.test": ("self-signed", "encrypt", False),
    "silentfail.test": ("plain", "encrypt", False),
}


@pytest.fixture(scope="module")
def run(tlsrpt_world: World) -> Iterator[Run]:
    """Every case through one instance; then its datagrams, log lines and DNS questions."""
    base, dns, sinks = tlsrpt_world
    routes, policy = {}, {}
    for domain, (sink_name, value, publishes) in CASES.items():
        sink = sinks[sink_name]
        dns.mail_domain(domain, tlsrpt=record(domain) if publishes else None)
        routes[domain] = f"smtp:{domain}:{sink.port}"
        policy[f"{domain}:{sink.port}"] = value
    # an IP-literal next-hop of a publishing domain, and a bracketed host name
    dns.txt("_smtp._tls.literal.test", record("literal.test"))
    routes["literal.test"] = f"smtp:[127.0.0.1]:{sinks['self-signed'].port}"
    policy[f"[127.0.0.1]:{sinks['self-signed'].port}"] = "encrypt"
    dns.host("mx.bracket.test")
    for name in ("bracket.test", "mx.bracket.test"):
        dns.txt(f"_smtp._tls.{name}", record(name))
    routes["bracket.test"] = f"smtp:[mx.bracket.test]:{sinks['self-signed'].port}"
    policy[f"[mx.bracket.test]:{sinks['self-signed'].port}"] = "encrypt"

    inst = instance(base, "measured", dns, routes, policy)
    trap = DatagramTrap(inst.queue_dir / SOCKET_NAME)
    try:
        inst.start()
        deliveries = send_all(inst, [*CASES, "literal.test", "bracket.test"])
        # Postfix sends the datagram during the handshake, before it logs the delivery:
        # everything is in the socket buffer by now; drain it, bounded.
        raw = trap.collect(count=len(deliveries) + 1, timeout=1.0)
        log = inst.maillog()
    finally:
        trap.close()
        errors = stop_all([inst])
    assert not errors, errors
    by_domain = {}
    for gram in raw:
        obj = json.loads(gram)
        by_domain[obj["d"]] = obj
    lines = {}
    for line in log.splitlines():
        m = _LOG_RE.search(line)
        if m:
            lines[m.group("domain")] = m
    yield Run(deliveries, raw, by_domain, lines, list(dns.asked))


pytestmark = [pytest.mark.postfix]


def _failure(run: Run, domain: str) -> dict[str, Any]:
    gram = run.by_domain[domain]
    [policy] = gram["policies"]
    assert (policy["t"], policy["f"]) == (1, 1), gram
    [detail] = policy["failure-details"]
    return dict(detail)


def test_a_datagram_and_a_log_line_only_for_domains_that_publish_tlsrpt(run: Run) -> None:
    reported = {"nostarttls.test", "selfsigned.test", "mismatch.test", "may.test",
                "encrypt.test", "secure.test", "expired.test", "mx.bracket.test"}
    assert set(run.by_domain) == reported
    assert len(run.raw) == len(reported)  # exactly one per session attempt
    assert set(run.log_lines) == reported
    # the silent domains had TLS sessions (and a deferral) all the same
    assert run.deliveries["silent.test"].status == "sent"
    assert run.deliveries["silentfail.test"].dsn == "4.7.4"


def test_postfix_looks_the_policy_up_per_next_hop_domain(run: Run) -> None:
    asked = set(run.asked)
    for domain in CASES:
        assert f"_smtp._tls.{domain}" in asked
    # a bracketed next-hop is looked up (and reported) under the host name, not the
    # recipient domain; an IP-literal next-hop is never looked up
    assert "_smtp._tls.mx.bracket.test" in asked
    assert "_smtp._tls.bracket.test" not in asked
    assert "_smtp._tls.literal.test" not in asked
    assert run.by_domain["mx.bracket.test"]["pr"] == record("mx.bracket.test")


def test_may_to_a_server_without_starttls_reports_nothing(run: Run) -> None:
    assert run.deliveries["mayplain.test"].status == "sent"
    assert "mayplain.test" not in run.by_domain
    assert "mayplain.test" not in run.log_lines


def test_no_starttls_under_encrypt_is_starttls_not_supported(run: Run) -> None:
    detail = _failure(run, "nostarttls.test")
    assert detail["c"] == 201
    assert "f" not in detail  # no failure reason code
    assert "STARTTLS" not in detail["h"]  # the server's EHLO reply, CRLF-joined
    assert detail["h"].startswith("250-sink.mailtls.test\r\n")
    m = run.log_lines["nostarttls.test"]
    assert (m["status"], m["type"]) == ("failure", "starttls_not_supported")
    assert run.deliveries["nostarttls.test"].dsn == "4.7.4"


def test_self_signed_under_secure_is_validation_failure_not_certificate_not_trusted(
        run: Run) -> None:
    detail = _failure(run, "selfsigned.test")
    assert detail["c"] == 205
    assert detail["f"] == "self-signed_certificate"
    m = run.log_lines["selfsigned.test"]
    assert (m["status"], m["type"], m["reason"]) == (
        "failure", "validation_failure", "self-signed_certificate")
    assert run.deliveries["selfsigned.test"].dsn == "4.7.5"


def test_name_mismatch_under_secure_is_certificate_host_mismatch(run: Run) -> None:
    detail = _failure(run, "mismatch.test")
    assert detail["c"] == 202
    assert "f" not in detail
    m = run.log_lines["mismatch.test"]
    assert (m["status"], m["type"]) == ("failure", "certificate_host_mismatch")
    assert run.deliveries["mismatch.test"].dsn == "4.7.5"


def test_an_expired_certificate_under_secure_is_certificate_expired(run: Run) -> None:
    """Issued by the trusted CA for the right name, but ended yesterday."""
    detail = _failure(run, "expired.test")
    assert detail["c"] == 204
    assert "f" not in detail
    m = run.log_lines["expired.test"]
    assert (m["status"], m["type"]) == ("failure", "certificate_expired")
    assert run.deliveries["expired.test"].dsn == "4.7.5"


@pytest.mark.parametrize("domain", ["may.test", "encrypt.test", "secure.test"])
def test_success_carries_no_failure_details(run: Run, domain: str) -> None:
    gram = run.by_domain[domain]
    assert gram == {"d": domain, "pr": record(domain),
                    "policies": [{"policy-type": 9, "policy-domain": domain, "t": 0, "f": 0}]}
    m = run.log_lines[domain]
    assert (m["status"], m["mx"], m["ip"], m["type"]) == ("success", f"mx.{domain}",
                                                          "127.0.0.1", None)
    assert run.deliveries[domain].status == "sent"


def test_the_datagram_shape(run: Run) -> None:
    """libtlsrpt 0.5.0rc1 (trixie): no ``dpv`` field; one ``no-policy-found`` (9) policy
    without DANE or an MTA-STS plug-in; failure details keyed by single letters."""
    for domain, gram in run.by_domain.items():
        assert list(gram) == ["d", "pr", "policies"]
        [policy] = gram["policies"]
        assert policy["policy-type"] == 9
        assert policy["policy-domain"] == domain
        for detail in policy.get("failure-details", []):
            assert set(detail) <= {"c", "s", "n", "h", "r", "a", "f"}
            assert (detail["s"], detail["r"]) == ("127.0.0.1", "127.0.0.1")
            assert detail["n"] == run.log_lines[domain]["mx"]
            assert FAILURE_NAMES[detail["c"]].replace("-", "_") == run.log_lines[domain]["type"]
    assert max(len(g) for g in run.raw) < 1024


def test_no_global_tls_level_means_no_tlsrpt_at_all(
        tlsrpt_world: World) -> None:
    """smtp(8) creates its TLSRPT state only when the *global* smtp_tls_security_level
    is above none; a policy-table ``encrypt`` is not enough."""
    base, dns, sinks = tlsrpt_world
    port = sinks["self-signed"].port
    dns.mail_domain("nolevel.test", tlsrpt=record("nolevel.test"))
    inst = instance(base, "nolevel", dns, {"nolevel.test": f"smtp:nolevel.test:{port}"},
                     {f"nolevel.test:{port}": "encrypt"}, smtp_tls_security_level="")
    trap = DatagramTrap(inst.queue_dir / SOCKET_NAME)
    try:
        inst.start()
        assert send_all(inst, ["nolevel.test"])["nolevel.test"].status == "sent"
        assert trap.collect(count=1, timeout=0.5) == []
        assert "TLSRPT:" not in inst.maillog()
    finally:
        trap.close()
        assert not stop_all([inst])
    assert "nolevel.test" in dns.asked  # the MX lookup happened
    assert "_smtp._tls.nolevel.test" not in dns.asked


@pytest.mark.parametrize("postfix_version", ["3.7"], indirect=True)
def test_postfix_37_has_no_tlsrpt(postfix_version: str) -> None:
    """The instance facts can tell: 3.7's ``postconf -d`` does not know the parameter."""
    proc = subprocess.run(["postconf", "-d", "smtp_tlsrpt_enable"],
                          capture_output=True, timeout=20, check=False)
    assert b"unknown parameter" in proc.stderr
    assert proc.stdout == b""


@pytest.mark.parametrize("skip_reused", ["yes", "no"])
def test_a_reused_tls_connection_is_reported_once_whatever_skip_reused_handshakes_says(
        tlsrpt_world: World, skip_reused: str) -> None:
    """Two messages over one cached TLS connection (``smtp_tls_connection_reuse``, through
    tlsproxy): one handshake, one datagram -- also with
    ``smtp_tlsrpt_skip_reused_handshakes = no``, which is about resumed TLS *sessions*,
    not reused connections.  Reports count handshakes, not messages."""
    expected = 1
    base, dns, sinks = tlsrpt_world
    port = sinks["self-signed"].port
    domain = f"reuse-{skip_reused}.test"
    dns.mail_domain(domain, tlsrpt=record(domain))
    inst = instance(base, f"reuse-{skip_reused}", dns, {domain: f"smtp:{domain}:{port}"},
                    {f"{domain}:{port}": "encrypt"},
                    smtp_connection_cache_on_demand="yes",
                    smtp_connection_cache_destinations=domain,
                    smtp_tls_connection_reuse="yes",
                    smtp_tlsrpt_skip_reused_handshakes=skip_reused)
    trap = DatagramTrap(inst.queue_dir / SOCKET_NAME)
    try:
        inst.start()
        first = send_all(inst, [domain])[domain]
        second = send_all(inst, [domain])[domain]
        raw = trap.collect(count=expected + 1, timeout=1.0)
    finally:
        trap.close()
        assert not stop_all([inst])
    assert (first.status, second.status) == ("sent", "sent")
    assert "conn_use=2" in second.line, second.line  # the second message did reuse it
    assert len(raw) == expected


def test_mail_goes_out_when_nothing_listens_on_the_socket(tlsrpt_world: World) -> None:
    """A collector that is down loses events, not mail."""
    base, dns, sinks = tlsrpt_world
    port = sinks["self-signed"].port
    dns.mail_domain("deaf.test", tlsrpt=record("deaf.test"))
    inst = instance(base, "deaf", dns, {"deaf.test": f"smtp:deaf.test:{port}"},
                    {f"deaf.test:{port}": "encrypt"})
    try:
        inst.start()
        delivery = send_all(inst, ["deaf.test"])["deaf.test"]
        log = inst.maillog()
    finally:
        assert not stop_all([inst])
    assert delivery.status == "sent"
    # the event is logged as usual, then the send fails with a warning; mail is unaffected
    assert "TLSRPT: status=success, domain=deaf.test" in log
    assert ("warning: Could not report TLS handshake result to tlsrpt library: "
            "No such file or directory (errno 2)") in log
