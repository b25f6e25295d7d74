"""The status writer: each policy's status from the pure chain (:mod:`..status`), written
only when it changed, with one Event per change."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .. import mailqueue
from ..crd import GROUP, KIND, VERSION
from ..kube import NotFound
from ..status import (
    Condition,
    InstanceView,
    event_type,
    policy_status,
    probe_status,
    transitions,
    verified_condition,
)
from ..world import ANN_APPLIED, ANN_TEMPLATE_REVISION, PolicyRecord
from .context import RESTART, Context

log = logging.getLogger("mailtls.controller")


class StatusWriter:
    """Turns the world and the instances' states into policy statuses and Events."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._locks: dict[str, asyncio.Lock] = {}
        self._io = asyncio.Semaphore(16)

    def recorded(self, ref: str, instance: str) -> tuple[list[str], str] | None:
        """(entries, revision for ``instance``) as the policy's stored status says."""
        ns, _, name = ref.partition("/")
        rec = self.ctx.world.policies.get(ns, {}).get(name)
        if rec is None:
            return None
        for item in rec.status.get("instances") or []:
            if isinstance(item, dict) and item.get("name") == instance:
                return list(rec.status.get("entries") or []), str(item.get("revision") or "")
        return None

    def views_for(self, rec: PolicyRecord) -> list[InstanceView]:
        """What each instance the policy targets says about it."""
        world = self.ctx.world
        views = []
        for key in world.instances_targeted_by(rec):
            state = self.ctx.states.get(key)
            if state is None or state.tables is None:
                views.append(InstanceView(key[1], "", len(world.pods_of(key)), 0))
                continue
            t = state.tables
            revision = state.since.get(rec.ref, ((), t.revision))[1]
            pods = world.pods_of(key)
            annotation = ANN_TEMPLATE_REVISION if self.ctx.strategy(pods) == RESTART \
                else ANN_APPLIED
            updated = sum(1 for p in pods if (p.ready or annotation == ANN_APPLIED)
                          and state.live_in(p.annotations.get(annotation), revision))
            if rec.policy is not None and \
                    state.rendered.get(rec.ref) != rec.policy.generation:
                updated = 0  # this generation is not in the tables yet
            views.append(InstanceView(
                name=key[1], revision=revision, pods_total=len(pods), pods_updated=updated,
                failure=state.failure if updated < len(pods) else None,
                losses=t.losses.get(rec.ref, []), lines=t.contributors.get(rec.ref, []),
                warnings=state.warnings.get(rec.ref, []), note=state.note))
        return views

    async def write_statuses(self, namespace: str) -> None:
        """Patch the status of every policy of the namespace whose status changed."""
        lock = self._locks.setdefault(namespace, asyncio.Lock())
        async with lock:
            now = self.ctx.clock()
            metrics = self.ctx.metrics
            writes = []
            counts: dict[str, int] = {}
            for rec in self.ctx.world.records(namespace):
                extra_conditions, extra_fields = self._observed(rec)
                status = policy_status(rec, self.views_for(rec), now, extra_conditions,
                                       extra_fields)
                ready = status["conditions"][0]["reason"]
                counts[ready] = counts.get(ready, 0) + 1
                if status != {k: rec.status.get(k) for k in status}:
                    writes.append(self._write_status(rec, status))
            for reason, n in counts.items():
                metrics.policies.labels(namespace, reason).set(n)
            metrics.exceptions_active.labels(namespace).set(sum(
                1 for rec in self.ctx.world.records(namespace) if rec.policy is not None
                and rec.policy.exception is not None and not rec.policy.is_expired(now)))
            await asyncio.gather(*writes)

    def _observed(self, rec: PolicyRecord) -> tuple[list[Condition], dict[str, Any]]:
        """Verified, status.probes and status.deferred of a policy, over its instances."""
        probes = []
        deferred: dict[str, Any] = {}
        keys = rec.policy.keys if rec.policy is not None else ()
        for key in self.ctx.world.instances_targeted_by(rec):
            state = self.ctx.states.get(key)
            if state is None:
                continue
            if rec.ref in state.seen.probes:
                probes.append((key[1], state.seen.probes[rec.ref].outcomes))
            if any(k in state.seen.deferred for k in keys):
                deferred[key[1]] = state.seen.deferred
        fields: dict[str, Any] = {}
        conditions = []
        verified = verified_condition(probes)
        if verified is not None:
            conditions.append(verified)
            fields["probes"] = probe_status(probes)
        if keys:
            merged = mailqueue.merge_deferred(*deferred.values())
            fields["deferred"] = mailqueue.summarise_for_policy(
                keys, merged, by_instance=deferred or None)
        return conditions, fields

    async def _write_status(self, rec: PolicyRecord, status: dict[str, Any]) -> None:
        changed = transitions(rec.status.get("conditions") or [], status["conditions"])
        async with self._io:
            try:
                await self.ctx.kube.patch_policy_status(rec.namespace, rec.name, status)
            except NotFound:
                return  # deleted meanwhile
            rec.status = {**rec.status, **status}
            if changed:  # one Event per change of the policy, led by its weightiest condition
                warnings = [c for c in changed if event_type(c) == "Warning"]
                lead = (warnings or changed)[0]
                await self._event(rec, event_type(lead), lead["reason"], "; ".join(
                    f"{c['type']}={c['status']} {c['reason']}: {c['message']}"
                    for c in changed))

    async def _event(self, rec: PolicyRecord, kind: str, reason: str, message: str) -> None:
        try:
            await self.ctx.kube.post_event(
                {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "namespace": rec.namespace,
                 "name": rec.name, "uid": rec.uid}, kind, reason, message)
        except Exception as exc:  # events are best effort; never block status
            log.debug("event for %s not posted: %s", rec.ref, exc)
