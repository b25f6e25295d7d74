"""The agent's TLSRPT collector: its Postfix's datagrams on a unix socket, counted per key.

Postfix 3.10 (``smtp_tlsrpt_enable = yes``) sends one JSON datagram per TLS
handshake to ``smtp_tlsrpt_socket_name`` (relative to the queue directory) on a
volume the Postfix and agent containers share.  The agent binds that socket
itself -- no ``tlsrpt-collectd`` (docs/tlsrpt.md says why) -- reads every
datagram with the total parser (:mod:`..tlsrpt`), attributes it to the policy
key that governed it and counts it (:mod:`..outcomes`).  Its report carries the
counts; the operator turns them into ``status.outcomes``.

Anyone who can reach the socket can send anything, so the receiver is bounded
whatever arrives:

- the kernel holds at most ``SO_RCVBUF`` bytes not yet read; beyond, it drops, and
  libtlsrpt (``MSG_DONTWAIT``) loses the event, never the mail (measured);
- every datagram is read into one reused buffer of :data:`..tlsrpt.MAX_DATAGRAM` + 1
  bytes; a longer one is refused by its length (``MSG_TRUNC``) without decoding;
- at most ``rate`` datagrams a second are read; past that, reading pauses until the
  second is over (a flood costs the agent a bounded share of a CPU) and the pause is
  counted (``throttled``);
- a refusal is counted and logged at most once a minute; the tally holds counts per
  key, never records.

Optionally (``--tlsrpt-forward``) every datagram that parsed is passed on, byte for
byte and without waiting, to another collector's socket -- ``tlsrpt-collectd``, whose
database ``tlsrpt-reportd`` sends RFC 8460 reports from (docs/tlsrpt.md): only one
process can bind Postfix's socket, and what reaches collectd this way is only what our
total parser accepted (one wrong-shaped datagram stops collectd, measured).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from .. import postfix, tlsrpt
from ..outcomes import UNMATCHED, Attributor, OutcomeReport, Routes, Tally, session_of
from ..podrunner import PodRef, PodRunner
from ..routing import InstanceConfig
from ..tlsrpt import Refusal

log = logging.getLogger("mailtls.agent.tlsrpt")

AUTO = "auto"
OFF = "off"
RCVBUF = 256 * 1024
LOG_EVERY = 60.0
"""Seconds between two log lines about refused datagrams."""
MAX_SITE_ROUTES = 100_000
"""Entries read from the site's own transport tables at most (``postmap -s``)."""


def socket_path(values: Mapping[str, str]) -> tuple[str | None, str]:
    """Where Postfix sends its TLSRPT datagrams, from its ``postconf -x`` values, or why
    not (``""``: this Postfix has no TLSRPT or it is off, which the operator lints)."""
    if values.get("smtp_tlsrpt_enable", "").strip().lower() != "yes":
        return None, ""
    name = values.get("smtp_tlsrpt_socket_name", "").strip()
    problem = tlsrpt.socket_name_problem(name)
    if problem is not None:
        return None, problem
    if name.startswith("/"):  # seen from the chroot in the queue directory when chrooted
        return name, ""
    queue = values.get("queue_directory", "").strip()
    if not queue.startswith("/"):
        return None, f"queue_directory {queue!r} is not an absolute path"
    return str(PurePosixPath(queue) / name), ""


class Receiver:
    """One bound unix datagram socket, read through the event loop at a bounded rate."""

    def __init__(self, path: str, handle: Callable[[bytes | None, int], None], *,
                 rate: int = 500, rcvbuf: int = RCVBUF,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.handle = handle
        """Called with (datagram, length); the datagram is None when it was too long."""
        self.rate = max(1, rate)
        self.clock = clock
        self.throttled = 0
        self._buf = bytearray(tlsrpt.MAX_DATAGRAM + 1)
        self._view = memoryview(self._buf)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._second = 0.0
        self._read = 0
        self._resume: asyncio.TimerHandle | None = None
        self.rcvbuf = rcvbuf

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind (a stale socket from an earlier agent is replaced; any other file at the
        path is left alone and refused) and start reading; raises OSError."""
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.setblocking(False)
            sock.bind(self.path)
            os.chmod(self.path, 0o666)  # smtp(8) sends as mail_owner, not as the agent
        except OSError:
            sock.close()
            raise
        self._sock, self._loop = sock, loop
        loop.add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._sock is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        now = self.clock()
        if now - self._second >= 1.0:
            self._second, self._read = now, 0
        while self._read < self.rate:
            try:
                size, _ = sock.recvfrom_into(self._buf, len(self._buf), socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("reading %s: %s", self.path, exc)
                return
            self._read += 1
            self.handle(bytes(self._view[:size]) if size <= tlsrpt.MAX_DATAGRAM else None,
                        size)
        # the rate is spent: stop reading until the second is over; the kernel buffers
        # (then drops) what comes meanwhile
        self.throttled += 1
        assert self._loop is not None
        self._loop.remove_reader(sock.fileno())
        self._resume = self._loop.call_later(max(0.0, self._second + 1.0 - self.clock()),
                                             self._unpause)

    def _unpause(self) -> None:
        self._resume = None
        if self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._readable)


class OutcomeCollector:
    """The tally of one pod's TLS sessions and the receiver that feeds it."""

    def __init__(self, *, window: float = 3600.0, rate: int = 500,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 forward: str | None = None) -> None:
        self.clock = clock
        self.forward = forward
        self.forwarded = self.forward_failed = 0
        self._out: socket.socket | None = None
        self.tally = Tally(window)
        self.attributor = Attributor(Routes())
        self.since = clock()
        self.rate = rate
        self.refused = 0
        self.error = ""
        self.receiver: Receiver | None = None
        self._refusals_logged = -LOG_EVERY
        self._refusals_since_log = 0

    # -- the datagrams --------------------------------------------------------------

    def datagram(self, data: bytes | None, size: int = 0) -> None:
        """One datagram as it arrived (None: longer than the parser reads)."""
        parsed = tlsrpt.parse(data) if data is not None else Refusal(
            f"datagram of {size} bytes is over {tlsrpt.MAX_DATAGRAM}")
        if isinstance(parsed, Refusal):
            self._refuse(parsed.reason)
            return
        if self.forward is not None and data is not None:
            self._pass_on(data)
        session = session_of(parsed)
        found = self.attributor.attribute(session.domain)
        now = self.clock()
        self.tally.record(found.key or UNMATCHED, session, now)
        if found.audit is not None:
            self.tally.record(found.audit, session, now)

    def _pass_on(self, data: bytes) -> None:
        """To the other collector, never waiting: if it is down or behind, it loses the
        datagram (as it would from libtlsrpt), the count does not."""
        assert self.forward is not None
        if self._out is None:
            self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._out.setblocking(False)
        try:
            self._out.sendto(data, self.forward)
            self.forwarded += 1
        except OSError:
            self.forward_failed += 1

    def _refuse(self, why: str) -> None:
        self.refused += 1
        self._refusals_since_log += 1
        now = time.monotonic()
        if now - self._refusals_logged >= LOG_EVERY:
            log.warning("TLSRPT datagram refused (%d since the last such line): %s",
                        self._refusals_since_log, why)
            self._refusals_logged, self._refusals_since_log = now, 0

    # -- where, and under which keys --------------------------------------------------

    def listen(self, path: str | None, error: str = "") -> None:
        """Receive at ``path`` (re-bind when it moved; None: stop), or say why not."""
        if self.receiver is not None and self.receiver.path == path:
            return
        self.stop()
        self.error = error
        if path is None:
            return
        receiver = Receiver(path, self.datagram, rate=self.rate)
        try:
            receiver.open(asyncio.get_running_loop())
        except OSError as exc:
            self.error = f"cannot bind {path}: {exc}"
            log.error("TLSRPT: %s", self.error)
            return
        self.receiver = receiver
        log.info("TLSRPT: receiving Postfix's datagrams at %s", path)

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None
        if self._out is not None:
            self._out.close()
            self._out = None

    def route(self, routes: Routes) -> None:
        if routes != self.attributor.routes:
            self.attributor = Attributor(routes)

    def report(self) -> OutcomeReport:
        return OutcomeReport(
            since=self.since, window_seconds=int(self.tally.window),
            keys=self.tally.snapshot(self.clock()),
            socket=self.receiver.path if self.receiver else "", error=self.error,
            refused=self.refused, throttled=self.receiver.throttled if self.receiver else 0)


async def site_routes(runner: PodRunner, pod: PodRef, config: InstanceConfig,
                      managed: str, *, timeout: float = 30.0) -> dict[str, str]:
    """The site's own transport entries (``postmap -s`` of each table in transport_maps
    but the operator's ``managed`` one), first table first; types that cannot be listed
    (regexp, pcre, ...) are skipped: their routes fall back to the bare next-hop."""
    found: dict[str, str] = {}
    for spec in config.transport_tables:
        spec = spec.removeprefix("proxy:")
        map_type, sep, path = spec.partition(":")
        if not sep or spec == managed or map_type not in postfix.MAP_TYPES:
            continue
        try:
            res = await runner.run(pod, postfix.postmap_dump(map_type, path), timeout=timeout)
        except Exception as exc:
            log.warning("cannot list the transport table %s: %s", spec, exc)
            continue
        if not res.ok:
            continue
        for line in res.stdout.decode("utf-8", "replace").splitlines()[:MAX_SITE_ROUTES]:
            key, _, value = line.strip().partition("\t") if "\t" in line else \
                line.strip().partition(" ")
            if key and value.strip():
                found.setdefault(key.lower(), value.strip())
    return found
