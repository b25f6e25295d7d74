"""``wait_event``: the waits inside the operator's and the agent's loops (debounce, status
writer, observer) must never lose a cancellation, or stopping them hangs."""

from __future__ import annotations

import asyncio

import pytest

from mailtls_operator.aio import wait_event


async def test_it_says_whether_the_event_came_or_the_time_ran_out() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 5.0) is True
    assert await wait_event(event, None) is True


@pytest.mark.parametrize("timeout", [None, 5.0])
async def test_a_loop_stops_when_cancelled_just_as_its_event_is_set(
        timeout: float | None) -> None:
    """``asyncio.wait_for`` on Python 3.11 returns the event instead of the cancellation
    here (gh-86296): the loop would go on waiting forever."""
    event = asyncio.Event()

    async def loop() -> None:
        while True:
            await wait_event(event, timeout)
            event.clear()

    task = asyncio.create_task(loop())
    for _ in range(3):
        await asyncio.sleep(0)  # the loop waits on the event
    event.set()
    task.cancel()  # in the same turn of the event loop
    done, _ = await asyncio.wait([task], timeout=5.0)
    assert task in done and task.cancelled()
