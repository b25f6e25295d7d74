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
  ``self-signed_certificate``; not 203), a name mismatch under ``secure`` 202;
  success under ``may``/``encrypt``/``secure`` carries no failure details;
- the real collector (``tlsrpt-collectd`` from ``tlsrpt-reporter``) stores
  what Postfix sends, and one well-formed JSON datagram of the wrong shape
  stops it.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed import (
    Delivery,
    InstanceSettings,
    LocalCA,
    LocalInstance,
    SmtpSink,
    plain_sink,
    postfix_unavailable,
    starttls_sink,
    stop_all,
    wait_until,
)
from testbed.postfixroot import build_for
from testbed.tlsrptworld import DatagramTrap, Port53Dns, write_resolv_conf

SOCKET_NAME = "tlsrpt/sock"  # relative to the queue directory, as Postfix requires
FAILURE_NAMES = {201: "starttls-not-supported", 202: "certificate-host-mismatch",
                 203: "certificate-not-trusted", 204: "certificate-expired",
                 205: "validation-failure"}
_LOG_RE = re.compile(
    r"TLSRPT: status=(?P<status>\w+), domain=(?P<domain>[^,]+), "
    r"receiving_mx=(?P<mx>[^\[]+)\[(?P<ip>[^\]]+)\]"
    r"(?:, failure_type=(?P<type>\w+))?(?:, failure_reason=(?P<reason>\S+))?$")


def _record(domain: str) -> str:
    return f"v=TLSRPTv1; rua=mailto:tlsrpt@{domain}"


@dataclass
class Run:
    """One instance's deliveries, the datagrams Postfix sent, its log, the names it asked."""

    deliveries: dict[str, Delivery]
    raw: list[bytes]
    by_domain: dict[str, dict[str, Any]]
    log_lines: dict[str, re.Match[str]]
    asked: list[str]


def _require_310() -> None:
    reason = postfix_unavailable("3.10")
    if reason is not None:
        pytest.skip(f"TLSRPT is measured on Postfix 3.10 only, which cannot run here: {reason}")


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Path, Port53Dns, dict[str, SmtpSink]]]:
    """A 0755 base directory, the port-53 DNS server and the three kinds of sink."""
    _require_310()
    base = Path(tempfile.mkdtemp(prefix="mailtls-tlsrpt-"))
    base.chmod(0o755)
    try:
        dns = Port53Dns().start()
    except OSError as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"a DNS server on port 53 of 127.53.x.y cannot be bound here: {exc}")
    ca = LocalCA(base / "ca")
    sinks = {"plain": plain_sink(),
             "self-signed": starttls_sink(base / "certs", name="self-signed"),
             "ca-signed": starttls_sink(base / "certs", name="ca-signed", ca=ca)}
    for sink in sinks.values():
        sink.start()
    (base / "ca.path").write_text(str(ca.pem_path))
    yield base, dns, sinks
    for sink in sinks.values():
        sink.stop()
    dns.stop()
    shutil.rmtree(base, ignore_errors=True)
    build_for("3.10").forget(base)


def _instance(base: Path, name: str, dns: Port53Dns, routes: Mapping[str, str],
              policy: Mapping[str, str], **main_cf: str) -> LocalInstance:
    """A created (not started) 3.10 instance reporting TLSRPT, resolving through ``dns``."""
    extra = {"smtp_tlsrpt_enable": "yes", "smtp_tlsrpt_socket_name": SOCKET_NAME,
             "smtp_tls_CAfile": (base / "ca.path").read_text(),
             "smtp_tls_security_level": "may",
             # a reused (cached) TLS connection has no handshake, hence no datagram
             # (smtp_tlsrpt_skip_reused_handshakes = yes): one connection per message here
             "smtp_connection_cache_on_demand": "no", **main_cf}
    settings = InstanceSettings(name=name, postfix="3.10", smtp_dns_support_level="enabled",
                                hosts={"jail.invalid": "127.0.0.1"},  # chroot smtp: own resolv
                                routes=dict(routes), extra_main_cf=extra)
    inst = LocalInstance(base / name, settings)
    inst.create(tls_policy="".join(f"{k} {v}\n" for k, v in policy.items()))
    write_resolv_conf(inst.queue_dir, dns.address)
    return inst


def _send_all(inst: LocalInstance, domains: list[str]) -> dict[str, Delivery]:
    sent = {d: inst.submit(f"user@{d}") for d in domains}
    return {d: inst.wait_for_delivery(q, timeout=30) for d, q in sent.items()}


# (sink, policy table value, publishes a TLSRPT policy) per recipient domain
CASES: dict[str, tuple[str, str, bool]] = {
    "nostarttls.test": ("plain", "encrypt", True),
    "selfsigned.test": ("self-signed", "secure", True),
    "mismatch.test": ("ca-signed", "secure match=other.name", True),
    "may.test": ("self-signed", "may", True),
    "encrypt.test": ("self-signed", "encrypt", True),
    "secure.test": ("ca-signed", "secure match=sink.mailtls.test", True),
    "mayplain.test": ("plain", "may", True),
    "silent.test": ("self-signed", "encrypt", False),
    "silentfail.test": ("plain", "encrypt", False),
}


@pytest.fixture(scope="module")
def run(world: tuple[Path, Port53Dns, dict[str, SmtpSink]]) -> Iterator[Run]:
    """Every case through one instance; then its datagrams, log lines and DNS questions."""
    base, dns, sinks = world
    routes, policy = {}, {}
    for domain, (sink_name, value, publishes) in CASES.items():
        sink = sinks[sink_name]
        dns.mail_domain(domain, tlsrpt=_record(domain) if publishes else None)
        routes[domain] = f"smtp:{domain}:{sink.port}"
        policy[f"{domain}:{sink.port}"] = value
    # an IP-literal next-hop of a publishing domain, and a bracketed host name
    dns.txt("_smtp._tls.literal.test", _record("literal.test"))
    routes["literal.test"] = f"smtp:[127.0.0.1]:{sinks['self-signed'].port}"
    policy[f"[127.0.0.1]:{sinks['self-signed'].port}"] = "encrypt"
    dns.host("mx.bracket.test")
    for name in ("bracket.test", "mx.bracket.test"):
        dns.txt(f"_smtp._tls.{name}", _record(name))
    routes["bracket.test"] = f"smtp:[mx.bracket.test]:{sinks['self-signed'].port}"
    policy[f"[mx.bracket.test]:{sinks['self-signed'].port}"] = "encrypt"

    inst = _instance(base, "measured", dns, routes, policy)
    trap = DatagramTrap(inst.queue_dir / SOCKET_NAME)
    try:
        inst.start()
        deliveries = _send_all(inst, [*CASES, "literal.test", "bracket.test"])
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
                "encrypt.test", "secure.test", "mx.bracket.test"}
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
    assert run.by_domain["mx.bracket.test"]["pr"] == _record("mx.bracket.test")


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


@pytest.mark.parametrize("domain", ["may.test", "encrypt.test", "secure.test"])
def test_success_carries_no_failure_details(run: Run, domain: str) -> None:
    gram = run.by_domain[domain]
    assert gram == {"d": domain, "pr": _record(domain),
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
        world: tuple[Path, Port53Dns, dict[str, SmtpSink]]) -> None:
    """smtp(8) creates its TLSRPT state only when the *global* smtp_tls_security_level
    is above none; a policy-table ``encrypt`` is not enough."""
    base, dns, sinks = world
    port = sinks["self-signed"].port
    dns.mail_domain("nolevel.test", tlsrpt=_record("nolevel.test"))
    inst = _instance(base, "nolevel", dns, {"nolevel.test": f"smtp:nolevel.test:{port}"},
                     {f"nolevel.test:{port}": "encrypt"}, smtp_tls_security_level="")
    trap = DatagramTrap(inst.queue_dir / SOCKET_NAME)
    try:
        inst.start()
        assert _send_all(inst, ["nolevel.test"])["nolevel.test"].status == "sent"
        assert trap.collect(count=1, timeout=0.5) == []
        assert "TLSRPT:" not in inst.maillog()
    finally:
        trap.close()
        assert not stop_all([inst])
    assert "nolevel.test" in dns.asked  # the MX lookup happened
    assert "_smtp._tls.nolevel.test" not in dns.asked


def _collectd() -> str:
    exe = Path(sys.executable).with_name("tlsrpt-collectd")
    if not exe.exists():
        pytest.skip("tlsrpt-collectd (pip install tlsrpt-reporter, in the test extras) "
                    "is not installed in this venv")
    return str(exe)


def _read_only(path: Path) -> sqlite3.Connection:
    """Never create the file: the collector decides what an existing database means."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _start_collectd(exe: str, sock: Path, workdir: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [exe, "--socketname", str(sock), "--storage", f"sqlite://{workdir}/collectd.sqlite",
         "--socketmode", "0666", "--sockettimeout", "1", "--max_uncommited_datagrams", "1",
         "--logfilename", str(workdir / "collectd.log"), "--pidfilename",
         str(workdir / "collectd.pid"), "--dump_path_for_invalid_datagram",
         str(workdir / "invalid")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(5)
            raise AssertionError(f"tlsrpt-collectd did not bind {sock}")
        time.sleep(0.05)
    return proc


def test_the_real_collector_stores_what_postfix_sends(
        world: tuple[Path, Port53Dns, dict[str, SmtpSink]]) -> None:
    exe = _collectd()
    base, dns, sinks = world
    cases = {"coll-fail.test": ("plain", "encrypt"), "coll-ok.test": ("self-signed", "may")}
    routes, policy = {}, {}
    for domain, (sink_name, value) in cases.items():
        dns.mail_domain(domain, tlsrpt=_record(domain))
        routes[domain] = f"smtp:{domain}:{sinks[sink_name].port}"
        policy[f"{domain}:{sinks[sink_name].port}"] = value
    inst = _instance(base, "collected", dns, routes, policy)
    workdir = base / "collectd"
    workdir.mkdir()
    sock = inst.queue_dir / SOCKET_NAME
    sock.parent.mkdir()
    sock.parent.chmod(0o755)
    proc = _start_collectd(exe, sock, workdir)
    try:
        inst.start()
        _send_all(inst, list(cases))

        def stored() -> list[tuple[Any, ...]] | None:
            try:
                with _read_only(workdir / "collectd.sqlite") as db:
                    rows = db.execute("SELECT domain, policy, cntrtotal, cntrfailure "
                                      "FROM finalresults ORDER BY domain").fetchall()
            except sqlite3.Error:
                return None
            return rows if len(rows) == 2 else None

        rows = wait_until(stored, timeout=10, what="the collector's two rows")
    finally:
        proc.terminate()
        rc = proc.wait(10)
        assert not stop_all([inst])
    assert rc == 0
    assert rows == [
        ("coll-fail.test", '{"policy-type": 9, "policy-domain": "coll-fail.test"}', 1, 1),
        ("coll-ok.test", '{"policy-type": 9, "policy-domain": "coll-ok.test"}', 1, 0)]
    with sqlite3.connect(workdir / "collectd.sqlite") as db:
        [(domain, reason)] = db.execute("SELECT domain, reason FROM failures").fetchall()
    assert domain == "coll-fail.test"
    assert json.loads(reason)["c"] == 201


_VALID = b'{"d": "ok.test", "pr": "v=TLSRPTv1; rua=mailto:x@ok.test", "policies": [' \
    b'{"policy-type": 9, "policy-domain": "ok.test", "t": 0, "f": 0}]}'


@pytest.mark.parametrize(("payload", "survives"), [
    (b"not json\xff", True),
    (b'{"d": "x", "pr": "y", "policies": [{"t": 0}]}', True),
    (b'{"d": "x", "pr": "y", "policies": 5}', False),
    (b"[" * 100_000 + b"]" * 100_000, False),
])
def test_one_wrong_shaped_datagram_stops_the_real_collector(
        tmp_path: Path, payload: bytes, survives: bool) -> None:
    """Measured on tlsrpt-reporter 0.6.0: invalid UTF-8/JSON and a policy without ``f``
    are logged and skipped (a valid datagram after them is stored), but a non-list
    ``policies`` (TypeError) or deep nesting (RecursionError) ends the daemon with exit 8:
    anyone who can write the socket can stop collection."""
    exe = _collectd()
    sock = tmp_path / "sock"
    proc = _start_collectd(exe, sock, tmp_path)

    def outcome() -> str | None:
        if proc.poll() is not None:
            return f"exit {proc.returncode}"
        try:
            with _read_only(tmp_path / "collectd.sqlite") as db:
                rows = db.execute("SELECT domain FROM finalresults").fetchall()
        except sqlite3.Error:
            return None
        return "stored" if rows == [("ok.test",)] else None

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(payload, str(sock))
            with contextlib.suppress(OSError):  # refused if it has already died
                s.sendto(_VALID, str(sock))
        result = wait_until(outcome, timeout=15, what="the collector to store or exit")
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
    assert result == ("stored" if survives else "exit 8")


@pytest.mark.parametrize("postfix_version", ["3.7"], indirect=True)
def test_postfix_37_has_no_tlsrpt(postfix_version: str) -> None:
    """The instance facts can tell: 3.7's ``postconf -d`` does not know the parameter."""
    proc = subprocess.run(["postconf", "-d", "smtp_tlsrpt_enable"],
                          capture_output=True, timeout=20, check=False)
    assert b"unknown parameter" in proc.stderr
    assert proc.stdout == b""
