"""Many pods: :func:`roll_out` in a stable order, ``parallelism`` at a time, stopping at
the first pod that does not verify."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import replace

from ..podrunner import PodRef, PodRunner
from .model import (
    DEFAULT_SAMPLE,
    DEFAULT_TIMEOUT,
    PodOutcome,
    PodStatus,
    PodTarget,
    RolloutOutcome,
    Step,
    TableSet,
)
from .pod import PodDone, apply_to_pod


async def roll_out(runner: PodRunner, targets: Iterable[PodTarget], tables: TableSet, *,
                   parallelism: int = 1, timeout: float = DEFAULT_TIMEOUT,
                   sample: int = DEFAULT_SAMPLE,
                   on_pod_done: PodDone | None = None) -> RolloutOutcome:
    """Apply ``tables`` to every target, ``parallelism`` pods at a time, in pod order.

    Stops starting pods at the first one that does not end ``applied`` or
    ``unchanged``; pods already in flight finish.  ``on_pod_done(target)`` is
    awaited after each pod that was applied and verified (the controller
    annotates the pod there); if it raises, that pod counts as failed at
    ``annotate`` (its table is live, and re-applying it later is a no-op for mail).
    """
    if parallelism < 1:
        raise ValueError("parallelism must be at least 1")
    order = sorted(targets, key=lambda t: t.pod)
    if len({t.pod for t in order}) != len(order):
        raise ValueError("a pod is listed twice")
    results: dict[PodRef, PodOutcome] = {}
    pending = iter(order)
    stopped = False

    async def worker() -> None:
        nonlocal stopped
        for target in pending:
            if stopped:
                return
            outcome = await apply_to_pod(runner, target, tables, timeout=timeout,
                                         sample=sample)
            if outcome.status is PodStatus.APPLIED and on_pod_done is not None:
                try:
                    await on_pod_done(target)
                except Exception as exc:  # the controller's failure, reported, not raised
                    outcome = replace(outcome, status=PodStatus.FAILED, step=Step.ANNOTATE,
                                      message=f"{type(exc).__name__}: {exc}")
            results[target.pod] = outcome
            if not outcome.ok:
                stopped = True

    await asyncio.gather(*(worker() for _ in range(min(parallelism, len(order)) or 1)))
    outcomes = tuple(results[t.pod] for t in order if t.pod in results)
    untouched = tuple(t.pod for t in order if t.pod not in results)
    return RolloutOutcome(tables.revision, len(order), outcomes, untouched)
