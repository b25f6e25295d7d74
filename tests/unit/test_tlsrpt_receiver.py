"""The agent's TLSRPT receiver on a real unix datagram socket: measured datagrams counted
under their keys, anything else refused and counted, a datagram past the size limit refused
by its length, reading paused (not lost) past the rate, and the socket where main.cf says."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailtls_operator.agent.tlsrpt import OutcomeCollector, socket_path
from mailtls_operator.outcomes import SUCCESS, UNMATCHED, Routes, to_doc
from mailtls_operator.tlsrpt import MAX_DATAGRAM

from .test_tlsrpt_parse import NO_STARTTLS
from .test_tlsrpt_parse import SUCCESS as SUCCESS_GRAM


@pytest.fixture
def path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "queue" / "tlsrpt" / "sock"


def _send(path: Path, grams: list[bytes]) -> threading.Thread:
    """Send from a thread, blocking while the receiver's queue (max_dgram_qlen) is full."""
    def run() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.settimeout(10)
            for gram in grams:
                s.sendto(gram, str(path))
    thread = threading.Thread(target=run)
    thread.start()
    return thread


async def _until(predicate: object, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        assert loop.time() < deadline, "not within the timeout"
        await asyncio.sleep(0.01)


async def test_datagrams_are_counted_under_their_keys_and_garbage_is_refused(
        path: Path) -> None:
    collector = OutcomeCollector()
    collector.route(Routes(frozenset({"may.test"})))
    collector.listen(str(path))
    try:
        assert path.is_socket() and path.stat().st_mode & 0o777 == 0o666
        grams = [SUCCESS_GRAM, NO_STARTTLS, b"\xff", b'{"policies": 5}', b"[" * 1000,
                 b"{" + b" " * MAX_DATAGRAM + b"}"]
        thread = _send(path, grams)
        await _until(lambda: collector.tally.sessions == 2 and collector.refused == 4)
        await asyncio.to_thread(thread.join)
        keys = collector.report().keys
        assert keys["may.test"].window == {SUCCESS: 1}
        assert keys[UNMATCHED].window == {"starttls-not-supported": 1}  # no key for it
    finally:
        collector.stop()
    assert not path.exists()


async def test_past_the_rate_reading_pauses_and_resumes(path: Path) -> None:
    collector = OutcomeCollector(rate=5)
    collector.listen(str(path))
    try:
        thread = _send(path, [SUCCESS_GRAM] * 12)
        await _until(lambda: collector.tally.sessions == 12)
        await asyncio.to_thread(thread.join)
        assert collector.receiver is not None and collector.receiver.throttled >= 2
        assert collector.report().throttled >= 2
    finally:
        collector.stop()


async def test_a_stale_socket_is_replaced_and_another_file_is_left_alone(path: Path) -> None:
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as stale:
        stale.bind(str(path))
    collector = OutcomeCollector()
    collector.listen(str(path))
    assert collector.receiver is not None and collector.error == ""
    collector.stop()
    path.write_text("not a socket")
    collector.listen(str(path))
    assert collector.receiver is None and "exists and is not a socket" in collector.error
    assert path.read_text() == "not a socket"
    report = collector.report()
    assert (report.socket, report.error) == ("", collector.error)


def test_the_socket_is_where_main_cf_says() -> None:
    facts = {"smtp_tlsrpt_enable": "yes", "smtp_tlsrpt_socket_name": "tlsrpt/sock",
             "queue_directory": "/var/spool/postfix"}
    assert socket_path(facts) == ("/var/spool/postfix/tlsrpt/sock", "")
    assert socket_path({**facts, "smtp_tlsrpt_socket_name": "/run/tlsrpt"}) == (
        "/run/tlsrpt", "")
    assert socket_path({**facts, "smtp_tlsrpt_enable": "no"}) == (None, "")
    assert socket_path({}) == (None, "")  # Postfix without TLSRPT
    where, why = socket_path({**facts, "smtp_tlsrpt_socket_name": "public/tlsrpt"})
    assert where is None and "public/" in why


def test_a_report_document_of_the_collector_is_json() -> None:
    collector = OutcomeCollector()
    collector.datagram(SUCCESS_GRAM)
    collector.datagram(None, MAX_DATAGRAM + 1)
    report = collector.report()
    assert report.refused == 1 and report.keys[UNMATCHED].total == {SUCCESS: 1}
    assert json.loads(json.dumps(to_doc(report)))["refused"] == 1
