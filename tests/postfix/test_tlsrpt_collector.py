"""The real TLSRPT collector (``tlsrpt-collectd`` from tlsrpt-reporter 0.6.0) against what
Postfix 3.10 sends, and against hostile datagrams (docs/tlsrpt.md)."""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from testbed import stop_all, wait_until

from .tlsrpt_helpers import SOCKET_NAME, World, instance, record, send_all, tlsrpt_world

__all__ = ["tlsrpt_world"]  # the fixture, re-used

pytestmark = [pytest.mark.postfix]


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
        tlsrpt_world: World) -> None:
    exe = _collectd()
    base, dns, sinks = tlsrpt_world
    cases = {"coll-fail.test": ("plain", "encrypt"), "coll-ok.test": ("self-signed", "may")}
    routes, policy = {}, {}
    for domain, (sink_name, value) in cases.items():
        dns.mail_domain(domain, tlsrpt=record(domain))
        routes[domain] = f"smtp:{domain}:{sinks[sink_name].port}"
        policy[f"{domain}:{sinks[sink_name].port}"] = value
    inst = instance(base, "collected", dns, routes, policy)
    workdir = base / "collectd"
    workdir.mkdir()
    sock = inst.queue_dir / SOCKET_NAME
    sock.parent.mkdir()
    sock.parent.chmod(0o755)
    proc = _start_collectd(exe, sock, workdir)
    try:
        inst.start()
        send_all(inst, list(cases))

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


def test_the_agent_passes_only_what_parsed_on_to_the_real_collector(tmp_path: Path) -> None:
    """``mailtls agent --tlsrpt-forward``: the agent holds Postfix's socket and hands each
    datagram that parsed to tlsrpt-collectd (for tlsrpt-reportd's reports); the one that
    stops collectd never reaches it."""
    from mailtls_operator.agent.tlsrpt import OutcomeCollector

    exe = _collectd()
    sock = tmp_path / "collectd.sock"
    proc = _start_collectd(exe, sock, tmp_path)
    collector = OutcomeCollector(forward=str(sock))
    try:
        collector.datagram(b'{"d": "x", "pr": "y", "policies": 5}')  # would stop collectd
        collector.datagram(_VALID)

        def stored() -> list[tuple[Any, ...]] | None:
            try:
                with _read_only(tmp_path / "collectd.sqlite") as db:
                    rows = db.execute("SELECT domain, cntrtotal FROM finalresults").fetchall()
            except sqlite3.Error:
                return None
            return rows or None

        assert wait_until(stored, timeout=15, what="collectd's row") == [("ok.test", 1)]
        assert proc.poll() is None
        assert (collector.refused, collector.forwarded, collector.forward_failed) == (1, 1, 0)
    finally:
        collector.stop()
        proc.terminate()
        proc.wait(10)
