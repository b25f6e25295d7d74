"""Small asyncio helpers shared by the operator and the agent.  No Kubernetes here."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass (``None``: no limit);
    return whether it is set.

    Not ``asyncio.wait_for``: on Python 3.11 it loses a cancellation that arrives just
    as the event is set (gh-86296), and a loop around it then never stops: the agent's
    observer, the operator's debounce and its status writer are such loops, and a lost
    cancellation made stopping them hang (seen once in ``make test``)."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True
