"""Pod rollouts: the instance's pods brought to the rendered revision, as a result.

The ``exec`` strategy stages, swaps, reloads and verifies each ready pod
(:mod:`..rollout`) and records the applied revision as a pod annotation; the
``restart`` strategy hands the revision to the owning workloads' rolling
update (:mod:`..workloads`); with the ``agent`` strategy each pod's agent does
the exec strategy's work itself and reports it (:mod:`..agent.collect`), so
nothing is run here.  Either way the caller gets a
:class:`RolloutResult` and decides about status, retries and metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .. import postfix, rollout
from ..agent.collect import STRATEGY as AGENT
from ..agent.collect import agent_view
from ..facts import InstanceFacts
from ..render import REVISION_KEY, Tables
from ..workloads import restart_rollout
from ..world import ANN_APPLIED, ANN_TEMPLATE_REVISION, InstanceKey, PodRecord
from .context import RESTART, Context

log = logging.getLogger("mailtls.controller")


@dataclass(frozen=True)
class RolloutResult:
    """Where an instance's pods stand after one rollout."""

    strategy: str
    pods_total: int = 0
    pods_updated: int = 0
    failure: str | None = None
    note: str = ""
    changed: int = 0
    """Pods this rollout brought to the revision (0: every ready pod already was)."""
    ready: list[PodRecord] = field(default_factory=list)
    facts: InstanceFacts | None = None
    """Agent strategy: the instance's facts as an agent reported them (no postconf here)."""


class PodRollouts:
    """Runs the instance's strategy over its pods."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def roll(self, key: InstanceKey, tables: Tables, *, check_live: bool,
                   quiet: bool, on_pending: Callable[[int], None]) -> RolloutResult:
        """Roll ``tables`` out to the instance's pods.  ``on_pending(updated)`` is called
        first when pods are behind (unless ``quiet``: a failure is already reported), so
        status can say Pending while a long rollout runs."""
        pods = self.ctx.world.pods_of(key)
        strategy = self.ctx.strategy(pods)
        if not pods:
            return RolloutResult(strategy, note="(no pods yet: new pods load the ConfigMap "
                                                "at start)")
        annotation = ANN_TEMPLATE_REVISION if strategy == RESTART else ANN_APPLIED
        behind = [p for p in pods if p.annotations.get(annotation) != tables.revision]
        if behind and not quiet:
            on_pending(len(pods) - len(behind))
        if strategy == RESTART:
            result = await restart_rollout(self.ctx.kube, pods, tables.revision)
            return RolloutResult(strategy, len(pods), result.updated, result.failure)
        if strategy == AGENT:
            view = agent_view(pods, tables.revision)
            return RolloutResult(strategy, len(pods), view.updated, view.failure,
                                 ready=[p for p in pods if p.ready], facts=view.facts)
        return await self._exec(key, pods, tables, check_live)

    async def _exec(self, key: InstanceKey, pods: list[PodRecord], tables: Tables,
                    check_live: bool) -> RolloutResult:
        ns, inst = key
        ready = [p for p in pods if p.ready]
        targets = [self.ctx.target(p) for p in ready]
        if check_live:
            targets = [await self._drifted(t, tables) for t in targets]
        tableset = rollout.TableSet.of(tables)
        todo = sum(1 for t in targets if t.applied_revision != tables.revision)
        if todo:
            log.info("rolling revision %s out to %d/%d pod(s) of %s/%s", tables.short_revision,
                     todo, len(pods), ns, inst)

        async def done(target: rollout.PodTarget) -> None:
            await self.ctx.kube.annotate_pod(ns, target.pod.name,
                                             {ANN_APPLIED: tables.revision})
            self.ctx.world.wrote_pod_annotations(ns, target.pod.name,
                                                 {ANN_APPLIED: tables.revision})
            log.info("%s/%s: pod %s verified on revision %s", ns, inst, target.pod.name,
                     tables.short_revision)

        cfg = self.ctx.config
        outcome = await rollout.roll_out(self.ctx.runner, targets, tableset,
                                         parallelism=cfg.parallelism, on_pod_done=done,
                                         timeout=cfg.exec_timeout)
        updated = sum(1 for p in pods if p.annotations.get(ANN_APPLIED) == tables.revision)
        return RolloutResult("exec", len(pods), updated, outcome.failure_message(),
                             changed=todo, ready=ready)

    async def _drifted(self, target: rollout.PodTarget, tables: Tables) -> rollout.PodTarget:
        """A pod whose annotation claims the revision but whose live table answers another
        (edited by hand, restored from an old volume): roll it again."""
        if target.applied_revision != tables.revision:
            return target
        try:
            res = await self.ctx.runner.run(target.pod, postfix.postmap_query(
                REVISION_KEY, target.map_type, target.map_path),
                timeout=self.ctx.config.exec_timeout)
        except Exception:
            return target  # unreachable now; the rollout itself will say so next time
        live = res.stdout.decode("utf-8", "replace").strip()
        if res.ok and live == tables.revision_value():
            return target
        log.warning("%s: table drifted (revision key answers %r): rolling it again",
                    target.pod, live or res.message())
        return replace(target, applied_revision=None)
