"""Give freed memory back to the operating system after a burst.  No Kubernetes here.

Loading 10,000 policies allocates far more (watch events, status patches, their
JSON) than the operator keeps; CPython and glibc keep the freed pages, so the
quiet RSS stayed at the burst's peak.  ``malloc_trim(0)`` releases what glibc
holds free (including free pages inside the heap, madvised away); it costs a few
milliseconds, so it runs at most once per ``interval`` and only after real work.
Without glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import time
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
    """Calls :meth:`after_burst` freely; trims at most once per ``interval`` seconds."""

    def __init__(self, interval: float = 30.0) -> None:
        self.interval = interval
        self._last = 0.0
        self.trims = 0

    def after_burst(self) -> bool:
        now = time.monotonic()
        libc = _libc()
        if libc is None or now - self._last < self.interval:
            return False
        self._last = now
        gc.collect()
        libc.malloc_trim(0)
        self.trims += 1
        return True
