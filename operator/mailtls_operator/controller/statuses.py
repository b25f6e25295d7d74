"""Statuses: each policy's status from the pure chain (:mod:`..status`), offered to the
status writer (:mod:`.statuswriter`) only when it changed; a Warning transition gets
one Event."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Coroutine
from dataclasses import replace
from datetime import datetime
from typing import Any

from .. import mailqueue
from ..agent.collect import STRATEGY as AGENT
from ..crd import GROUP, KIND, VERSION
from ..kube import NotFound
from ..outcome_status import (
    PolicyOutcome,
    observed,
    outcome_status,
    policy_outcome,
    tls_failures_condition,
    tlsrpt_lint,
)
from ..status import (
    PENDING,
    TLSRPT_OFF,
    Condition,
    InstanceView,
    event_type,
    policy_status,
    probe_status,
    transitions,
    verified_condition,
)
from ..world import ANN_APPLIED, ANN_TEMPLATE_REVISION, PolicyRecord, shared
from .context import RESTART, Context
from .statuswriter import StatusWriter

log = logging.getLogger("mailtls.controller")


class Statuses:
    """Turns the world and the instances' states into policy statuses, offered to the
    :class:`~.statuswriter.StatusWriter` (coalesced, rate-limited, retried), which calls
    back :meth:`_write_status` for each patch and its Warning Event."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        cfg = ctx.config
        self.writer = StatusWriter(
            self._write_status, qps=cfg.status_qps, burst=cfg.status_burst,
            retry_base=cfg.retry_base, retry_max=cfg.retry_max, describe=one_line,
            on_failure=lambda rec: ctx.metrics.status_write_failures.labels(
                rec.namespace).inc())
        self._io = asyncio.Semaphore(16)
        self._wrote: dict[str, tuple[str, bytes, list[dict[str, Any]]]] = {}
        """ref -> (uid, digest, conditions) of the last status written whose watch echo
        has not arrived: a stale event must not make it look unwritten (another patch)
        or its conditions look new (another Event)."""
        self._excepted: dict[str, set[str]] = {}
        """namespace -> policies with exception series (to remove them when they end)."""
        self._background: set[asyncio.Task[None]] = set()

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
            revision = state.since.get(rec.ref, (((), ""), t.revision))[1]
            pods = world.pods_of(key)
            annotation = ANN_TEMPLATE_REVISION if self.ctx.strategy(pods) == RESTART \
                else ANN_APPLIED
            updated = sum(1 for p in pods if (p.ready or annotation == ANN_APPLIED)
                          and state.live_in(p.annotations.get(annotation), revision))
            if rec.policy is not None and \
                    state.rendered.get(rec.ref) != rec.policy.generation:
                updated = 0  # this generation is not in the tables yet
            warnings = state.warnings.get(rec.ref, [])
            if state.facts is not None and self.ctx.strategy_of(key) == AGENT and (
                    lint := tlsrpt_lint(state.facts.values, state.seen.collector_error)):
                warnings = [*warnings, (TLSRPT_OFF, lint)]
            views.append(InstanceView(
                name=key[1], revision=revision, pods_total=len(pods), pods_updated=updated,
                failure=state.failure if updated < len(pods) else None,
                losses=t.losses.get(rec.ref, []), lines=t.contributors.get(rec.ref, []),
                warnings=warnings, note=state.note))
        return views

    async def write_statuses(self, namespace: str) -> None:
        """Offer the status of every policy of the namespace whose status changed to the
        status writer.  Never blocks on the API: enforcement goes on while statuses
        drain.  A ``Pending`` status waits ``pending_grace`` seconds, so a rollout that
        finishes first costs its policies one write, not two."""
        now = self.ctx.clock()
        metrics = self.ctx.metrics
        counts: dict[str, int] = {}
        for rec in self.ctx.world.records(namespace):
            extra_conditions, extra_fields = self._observed(rec)
            status = policy_status(rec, self.views_for(rec), now, extra_conditions,
                                   extra_fields)
            ready = status["conditions"][0]["reason"]
            counts[ready] = counts.get(ready, 0) + 1
            if status == {k: rec.status.get(k) for k in status}:
                self._wrote.pop(rec.ref, None)  # stored (the echo of our write arrived)
                self.writer.forget(rec.ref)
            elif self._written(rec) == (rec.uid, status_digest(status)):
                self.writer.forget(rec.ref)  # written; its echo has not arrived yet
            else:
                self.writer.offer(rec.ref, rec, status,
                                  delay=self.ctx.config.pending_grace if ready == PENDING
                                  else 0.0)
        for reason, n in counts.items():
            metrics.policies.labels(namespace, reason).set(n)
        self._gauge_exceptions(namespace, now)

    def _gauge_exceptions(self, namespace: str, now: datetime) -> None:
        """Exceptions in force: their count, and per exception its window, so an alert can
        say "in force for N days" or "expires within a day" (exceptions are few: a series
        each, and none for ordinary policies)."""
        metrics = self.ctx.metrics
        windows = {rec.name: rec.policy.exception for rec in self.ctx.world.records(namespace)
                   if rec.policy is not None and rec.policy.exception is not None
                   and not rec.policy.is_expired(now) and not rec.policy.is_scheduled(now)}
        metrics.exceptions_active.labels(namespace).set(len(windows))
        for name in self._excepted.get(namespace, set()) - set(windows):
            metrics.exception_start.remove(namespace, name)
            metrics.exception_expiry.remove(namespace, name)
        for name, window in windows.items():
            metrics.exception_start.labels(namespace, name).set(window.starts_at.timestamp())
            metrics.exception_expiry.labels(namespace, name).set(window.expires_at.timestamp())
        self._excepted[namespace] = set(windows)

    def forget(self, ref: str) -> None:
        """The policy is gone: drop any status still waiting to be written."""
        self.writer.forget(ref)
        self._wrote.pop(ref, None)

    def _written(self, rec: PolicyRecord) -> tuple[str, bytes] | None:
        wrote = self._wrote.get(rec.ref)
        return (wrote[0], wrote[1]) if wrote is not None else None

    def _stored_conditions(self, rec: PolicyRecord) -> list[dict[str, Any]]:
        """The conditions as last written by us (while the echo is pending), else as the
        record says."""
        wrote = self._wrote.get(rec.ref)
        if wrote is not None and wrote[0] == rec.uid:
            return wrote[2]
        return list(rec.status.get("conditions") or [])

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background, kept alive until it ends, cancelled at stop."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def busy(self) -> bool:
        """Is a status write pending or running (the idle signal waits for it)?"""
        # a copy: the test's and the bench's threads read this flag too
        return not self.writer.idle.is_set() or any(
            not t.done() for t in list(self._background))

    async def stop(self) -> None:
        """No more writes: background offers are cancelled, the writer stops."""
        for task in list(self._background):
            task.cancel()
        await self.writer.stop()

    def _observed(self, rec: PolicyRecord) -> tuple[list[Condition], dict[str, Any]]:
        """Verified, TLSFailures, status.probes, status.deferred and status.outcomes of a
        policy, over its instances."""
        probes = []
        deferred: dict[str, Any] = {}
        outcomes: list[PolicyOutcome] = []
        keys = rec.policy.keys if rec.policy is not None else ()
        audit = rec.policy is not None and rec.policy.mode == "audit"
        for key in self.ctx.world.instances_targeted_by(rec):
            state = self.ctx.states.get(key)
            if state is None:
                continue
            if rec.ref in state.seen.probes:
                probes.append((key[1], state.seen.probes[rec.ref].outcomes))
            if any(k in state.seen.deferred for k in keys):
                deferred[key[1]] = state.seen.deferred
            if state.seen.outcomes and state.tables is not None:
                # an enforced policy: the keys whose line is its own (a key lost to a
                # conflict governs under the winner); an audit policy: its keys
                owners = state.tables.owners
                mine = keys if audit else [k for k in keys if owners.get(k) == rec.ref]
                found = policy_outcome(key[1], state.seen.outcome_window, mine,
                                       state.seen.outcomes)
                if found is not None:
                    outcomes.append(found)
        fields: dict[str, Any] = {}
        conditions = []
        verified = verified_condition(probes)
        if verified is not None:
            if audit and outcomes:  # the audit verdict: probed, and observed
                verified = replace(verified, message=f"{verified.message}; "
                                                     f"{observed(outcomes)}")
            conditions.append(verified)
            fields["probes"] = probe_status(probes)
        if not audit and (failing := tls_failures_condition(outcomes)) is not None:
            conditions.append(failing)
        if keys:
            merged = mailqueue.merge_deferred(*deferred.values())
            fields["deferred"] = mailqueue.summarise_for_policy(
                keys, merged, by_instance=deferred or None)
        if outcomes:
            fields["outcomes"] = outcome_status(outcomes)
        elif rec.status.get("outcomes") is not None:
            fields["outcomes"] = None  # the window emptied: the merge patch removes them
        return conditions, fields

    async def _write_status(self, rec: PolicyRecord, status: dict[str, Any]) -> None:
        """One status patch (the status writer calls it; a failure raises to it), then an
        Event when a condition changed to something a person should act on."""
        changed = transitions(self._stored_conditions(rec), status["conditions"])
        async with self._io:
            try:
                await self.ctx.kube.patch_policy_status(rec.namespace, rec.name, status)
            except NotFound:
                return  # deleted meanwhile
        rec.status = shared({**rec.status, **status})
        self._wrote[rec.ref] = (rec.uid, status_digest(status), list(status["conditions"]))
        warnings = [c for c in changed if event_type(c) == "Warning"]
        if warnings:  # one Event per change, led by its weightiest condition
            await self._event(rec, "Warning", warnings[0]["reason"], "; ".join(
                f"{c['type']}={c['status']} {c['reason']}: {c['message']}" for c in warnings))

    async def _event(self, rec: PolicyRecord, kind: str, reason: str, message: str) -> None:
        try:
            await self.ctx.kube.post_event(
                {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "namespace": rec.namespace,
                 "name": rec.name, "uid": rec.uid}, kind, reason, message)
        except Exception as exc:  # events are best effort; never block status
            log.debug("event for %s not posted: %s", rec.ref, exc)


def status_digest(status: dict[str, Any]) -> bytes:
    """A status's identity, so the last one written is remembered in 16 bytes."""
    return hashlib.blake2b(json.dumps(status, sort_keys=True, default=str).encode(),
                           digest_size=16).digest()


def one_line(exc: BaseException) -> str:
    """An API error as one log line: its status and the server's message when it has one."""
    status, body = getattr(exc, "status", None), getattr(exc, "body", None)
    if status is not None:
        try:
            message = json.loads(body or "{}").get("message") or ""
        except (ValueError, AttributeError):
            message = ""
        return f"HTTP {status}: {message or getattr(exc, 'reason', '')}"
    return (str(exc).splitlines() or [type(exc).__name__])[0]
