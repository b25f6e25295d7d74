"""What every part of the controller shares: settings, clients, the world, per-instance state."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from .. import probe, rollout
from ..kube import Kube
from ..metrics import Metrics
from ..podrunner import PodRef, PodRunner
from ..policy import DEFAULT_MAX_EXCEPTION
from ..world import (
    ANN_APPLIED,
    ANN_CONTAINER,
    ANN_MAP_PATH,
    ANN_MAP_TYPE,
    ANN_RELOAD,
    ANN_STRATEGY,
    InstanceKey,
    PodRecord,
    World,
)
from .state import InstanceState

RESTART: str = "restart"


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` and wait for it to end, whatever it ends with (shutting down)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Config:
    """Operator-wide settings (``mailtls run`` options)."""

    namespaces: list[str] = field(default_factory=list)
    debounce: float = 0.5
    max_delay: float = 5.0
    parallelism: int = 1
    default_strategy: str = "exec"
    max_exception: timedelta = DEFAULT_MAX_EXCEPTION
    retry_base: float = 1.0
    retry_max: float = 300.0
    resync_interval: float = 300.0
    exec_timeout: float = 60.0
    observe_interval: float = 3600.0
    """Seconds between probes and queue reads of an instance (also after every rollout);
    0 disables the schedule."""
    probe_enforced: bool = True
    """Probe enforce-mode policies too (audit-mode ones are always probed)."""
    probe_concurrency: int = 4
    status_qps: float = 100.0
    """Status patches per second at most (a token bucket of ``status_burst``): a bulk
    load's statuses follow its enforcement instead of flooding the API server."""
    status_burst: int = 500
    pending_grace: float = 2.0
    """Seconds a Pending status waits before it is written: a rollout that is done by
    then writes its policies once (RolledOut)."""
    probe_timeouts: probe.ProbeTimeouts = field(default_factory=probe.ProbeTimeouts)


@dataclass
class Context:
    """The operator's shared parts, handed to each component instead of the conductor."""

    kube: Kube
    runner: PodRunner
    config: Config
    clock: Callable[[], datetime]
    metrics: Metrics
    world: World
    states: dict[InstanceKey, InstanceState] = field(default_factory=dict)

    def strategy(self, pods: list[PodRecord]) -> str:
        """The instance's rollout strategy (its first pod's annotation, else the default)."""
        if not pods:
            return self.config.default_strategy
        return pods[0].annotation(ANN_STRATEGY, self.config.default_strategy)

    def strategy_of(self, key: InstanceKey) -> str:
        return self.strategy(self.world.pods_of(key))

    def target(self, pod: PodRecord) -> rollout.PodTarget:
        """Where and how the exec strategy writes ``pod``'s table."""
        return rollout.PodTarget(
            pod=PodRef(pod.namespace, pod.name, pod.annotation(ANN_CONTAINER, "postfix")),
            map_path=pod.annotation(ANN_MAP_PATH, rollout.DEFAULT_MAP_PATH),
            map_type=pod.annotation(ANN_MAP_TYPE, rollout.DEFAULT_MAP_TYPE),
            applied_revision=pod.annotations.get(ANN_APPLIED),
            reload=pod.annotation(ANN_RELOAD, "false").lower() == "true",
        )
