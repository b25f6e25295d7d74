"""Give freed memory back to the operating system after a burst.  No Kubernetes here.

Loading 10,000 policies allocates far more (watch events, status patches, their
JSON) than the operator keeps; CPython and glibc keep the freed pages, so the
quiet RSS stayed at the burst's peak.  ``malloc_trim(0)`` releases what glibc
holds free (including free pages inside the heap, madvised away); it costs a few
milliseconds, so it runs once the operator has been quiet for a moment after real
work, and at most every ``interval`` while work never pauses.
Without glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import time
from collections.abc import Callable
from typing import Any


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


class Trimmer:
    """Trims once the operator has been quiet for ``quiet`` seconds after work (a bulk
    load, a restart's list and the replay of its events); while work never pauses, at
    most every ``interval`` seconds.  ``work()`` is cheap: call it for every event."""

    def __init__(self, quiet: float = 2.0, interval: float = 30.0,
                 ready: Callable[[], bool] = lambda: True) -> None:
        self.quiet = quiet
        self.interval = interval
        self.ready = ready
        """Is the operator idle (no render, rollout or status write in flight)?  Its end
        must call :meth:`work`."""
        self.trims = 0
        self._owed_since: float | None = None
        self._last_work = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def work(self) -> None:
        """Something was done: trim after the next quiet spell."""
        now = time.monotonic()
        self._last_work = now
        if self._owed_since is None:
            self._owed_since = now
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a synchronous caller): nothing to schedule
                return
            self._timer = loop.call_later(self.quiet, self._check)

    def _check(self) -> None:
        """Not ready (a render, rollout or status write in flight): nothing is scheduled,
        since the end of that work calls :meth:`work` again."""
        self._timer = None
        if self._owed_since is None or not self.ready():
            return
        now = time.monotonic()
        quiet_for, owed_for = now - self._last_work, now - self._owed_since
        if quiet_for < self.quiet and owed_for < self.interval:
            self._timer = asyncio.get_running_loop().call_later(
                max(0.05, self.quiet - quiet_for), self._check)
            return
        self._owed_since = None
        self.trim()

    def trim(self) -> bool:
        libc = _libc()
        gc.collect()
        if libc is None:
            return False
        libc.malloc_trim(0)
        self.trims += 1
        return True

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
