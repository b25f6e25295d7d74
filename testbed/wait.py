"""Bounded polling: the one way the test bed, the tests, the bench and the demo wait for
a condition (never a sleep standing in for one)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def until(predicate: Callable[[], T | None], timeout: float, what: str, *,
          every: float = 0.1, error: type[Exception] = TimeoutError) -> T:
    """Call ``predicate`` every ``every`` seconds until it returns something truthy and
    return that; at the deadline raise ``error`` naming ``what`` and the last value (tests
    pass ``AssertionError``, the test bed its own error type)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"not within {timeout:g} s: {what}; last value {value!r}")
        time.sleep(every)


async def until_async(predicate: Callable[[], T | None], timeout: float, what: str, *,
                      every: float = 0.1, check: Callable[[], None] | None = None,
                      error: type[Exception] = TimeoutError) -> T:
    """:func:`until` for async code, the event loop free between calls; ``check`` runs
    before each call and raises when waiting is pointless (the awaited process died)."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"not within {timeout:g} s: {what}; last value {value!r}")
        await asyncio.sleep(every)
