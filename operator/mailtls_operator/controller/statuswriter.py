"""Status writes that follow enforcement: coalesced per policy, rate-limited, retried.

A bulk load of 10,000 policies used to cost two or three status patches and one
or two Events per policy, written by the worker before it could render again:
enforcement waited behind bookkeeping.  Here the worker only *offers* the status
it computed; one drain task writes, per policy, the latest status offered --
never an intermediate one it has since replaced -- at most ``qps`` writes a
second (a token bucket with ``burst``).  A ``Pending`` status may be offered with
a delay: when the rollout finishes first, the policy gets one write, ``RolledOut``.

A refused or failed write (a 422 from a stricter API server, a 500, a timeout) is
logged with the policy's name and offered again after a backoff; it never stops
another policy's write.  Events are posted only for transitions a person should
act on (Warning conditions: refusals, conflicts, rollout failures, lint, break-
glass), not for the routine progress of every policy in a bulk load.

No Kubernetes import: the write itself is a callable passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..aio import wait_event

log = logging.getLogger("mailtls.status")

WriteFn = Callable[[Any, dict[str, Any]], Awaitable[None]]
"""Write ``status`` of the policy record; raises on failure."""


@dataclass
class _Offer:
    record: Any
    status: dict[str, Any]
    not_before: float
    failures: int = 0


class StatusWriter:
    """One drain task; ``offer`` never blocks and never fails."""

    def __init__(self, write: WriteFn, *, qps: float = 100.0, burst: int = 500,
                 concurrency: int = 16, retry_base: float = 1.0, retry_max: float = 300.0,
                 describe: Callable[[Any], str] = str,
                 on_failure: Callable[[Any], None] | None = None) -> None:
        self._write = write
        self.qps = qps
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._refilled = time.monotonic()
        self._concurrency = asyncio.Semaphore(max(1, concurrency))
        self.retry_base = retry_base
        self.retry_max = retry_max
        self._describe = describe
        self._on_failure = on_failure
        self._pending: dict[str, _Offer] = {}
        self._in_flight: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.written = 0
        self.failed = 0
        self.on_idle: Callable[[], None] | None = None
        """Called when the last pending write is done (the operator trims memory)."""

    # ------------------------------------------------------------------- interface

    def offer(self, ref: str, record: Any, status: dict[str, Any], *,
              delay: float = 0.0) -> None:
        """Write ``status`` for ``ref`` (replacing any status offered before and not yet
        written) no sooner than ``delay`` seconds from now."""
        not_before = time.monotonic() + delay
        current = self._pending.get(ref)
        if current is not None:
            # a newer status replaces the older; an earlier deadline is kept unless the
            # new offer asks to wait (a Pending that may yet be superseded)
            current.record, current.status = record, status
            current.not_before = not_before if delay > 0 else min(current.not_before,
                                                                    not_before)
        else:
            self._pending[ref] = _Offer(record, status, not_before)
        self.idle.clear()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(),
                                                               name="mailtls:status")

    def forget(self, ref: str) -> None:
        """The policy is gone: drop what was not written."""
        self._pending.pop(ref, None)
        self._update_idle()

    @property
    def backlog(self) -> int:
        return len(self._pending) + len(self._in_flight)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for task in list(self._writes):
            task.cancel()
        for task in list(self._writes):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --------------------------------------------------------------------- drain

    def _take_token(self) -> float:
        """0 if a write may start now, else the seconds until one may."""
        if self.qps <= 0:
            return 0.0
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.qps)
        self._refilled = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.qps

    async def _drain(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            ready = [ref for ref, o in self._pending.items()
                     if o.not_before <= now and ref not in self._in_flight]
            for ref in ready:
                wait = self._take_token()
                if wait > 0:
                    await asyncio.sleep(wait)
                    self._take_token()
                offer = self._pending.pop(ref, None)
                if offer is None:
                    continue  # forgotten meanwhile
                await self._concurrency.acquire()
                self._in_flight.add(ref)
                task = asyncio.get_running_loop().create_task(self._write_one(ref, offer))
                self._writes.add(task)
                task.add_done_callback(self._writes.discard)
            self._update_idle()
            waiting = [o.not_before for ref, o in self._pending.items()
                       if ref not in self._in_flight]
            timeout = max(0.0, min(waiting) - time.monotonic()) if waiting else None
            await wait_event(self._wake, timeout)

    async def _write_one(self, ref: str, offer: _Offer) -> None:
        try:
            await self._write(offer.record, offer.status)
            self.written += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed += 1
            offer.failures += 1
            delay = min(self.retry_max, self.retry_base * 2 ** (offer.failures - 1))
            log.warning("status of %s not written (%s); retrying in %.1fs", ref,
                        self._describe(exc), delay)
            if self._on_failure is not None:
                self._on_failure(offer.record)
            if ref not in self._pending:  # nothing newer offered meanwhile: retry this one
                offer.not_before = time.monotonic() + delay
                self._pending[ref] = offer
        finally:
            self._in_flight.discard(ref)
            self._concurrency.release()
            self._wake.set()
            self._update_idle()

    def _update_idle(self) -> None:
        if self._pending or self._in_flight:
            self.idle.clear()
        elif not self.idle.is_set():
            self.idle.set()
            if self.on_idle is not None:
                self.on_idle()
