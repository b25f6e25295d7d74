"""One worker per instance: debounce a burst of changes, then converge, one run at a time."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ..aio import wait_event
from ..kube import NamespaceTerminating
from ..world import InstanceKey
from .context import Config, cancel_and_wait

log = logging.getLogger("mailtls.controller")


class InstanceWorker:
    """Waits for a quiet period (bounded by ``max_delay``) so a burst of 1,000 applies
    becomes one convergence; a failed run is retried after ``retry_base`` seconds."""

    def __init__(self, key: InstanceKey, config: Config,
                 converge: Callable[[InstanceKey], Awaitable[None]],
                 on_idle: Callable[[], None] = lambda: None) -> None:
        self.key = key
        self.config = config
        self.converge = converge
        self.on_idle = on_idle
        self.dirty = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.retry_handle: asyncio.TimerHandle | None = None
        self.idle = asyncio.Event()
        self.idle.set()

    def wake(self) -> None:
        self.idle.clear()
        self.dirty.set()
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._loop(),
                                                              name=f"mailtls:{self.key}")

    def wake_later(self, delay: float) -> None:
        if self.retry_handle is not None:
            self.retry_handle.cancel()
        self.retry_handle = asyncio.get_running_loop().call_later(delay, self.wake)

    def abandon(self) -> None:
        """Drop in-flight work (leadership lost): staged files are re-staged next time."""
        if self.task is not None:
            self.task.cancel()
        self.idle.set()

    async def _debounce(self) -> None:
        deadline = time.monotonic() + self.config.max_delay
        while True:
            self.dirty.clear()
            remaining = min(self.config.debounce, deadline - time.monotonic())
            if remaining <= 0:
                return
            if not await wait_event(self.dirty, remaining):
                return

    async def _loop(self) -> None:
        while True:
            await self._debounce()
            try:
                await self.converge(self.key)
            except asyncio.CancelledError:
                raise
            except NamespaceTerminating as exc:  # its deletion events will retire it
                log.warning("%s/%s: not converged, the namespace is being deleted: %s",
                            *self.key, exc)
            except Exception:
                log.exception("converging %s/%s failed; retrying", *self.key)
                self.wake_later(self.config.retry_base)
            if not self.dirty.is_set():
                self.idle.set()
                self.on_idle()
                await self.dirty.wait()
                self.idle.clear()

    async def stop(self) -> None:
        if self.retry_handle is not None:
            self.retry_handle.cancel()
        await cancel_and_wait(self.task)
