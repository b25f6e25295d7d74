"""Observation scheduling: probes and queue reads beside the rollout, never in its way.

After every convergence and then every ``observe_interval`` seconds, one
background task per instance reads the pods' queues (releasing mail deferred
under keys whose line just changed) and probes the policies that are due.
A request while a run is in flight makes it run once more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from ..agent.collect import STRATEGY as AGENT
from ..agent.collect import agent_view
from ..facts import read_facts
from ..mailqueue import DeferredSummary
from ..observer import PolicyProbes, due_probes, observe_queues, probe_policies
from ..outcome_status import SessionTotals
from ..outcomes import OutcomeReport, merge_keys
from ..render import Tables
from ..world import InstanceKey
from .context import Context, cancel_and_wait
from .state import InstanceState

log = logging.getLogger("mailtls.controller")


class Observations:
    """Schedules each instance's observation task; statuses are written by the caller's
    ``write_statuses`` when something new was seen."""

    def __init__(self, ctx: Context, write_statuses: Callable[[str], Awaitable[None]],
                 may_act: Callable[[], bool], discovery: Any = None) -> None:
        self.ctx = ctx
        self.write_statuses = write_statuses
        self.may_act = may_act
        self.discovery = discovery  # testing-mode discovered lines are probed too
        self.stopping = False
        self._series: dict[InstanceKey, set[str]] = {}
        self._probe_failed: dict[InstanceKey, dict[str, int]] = {}
        """Policies with a ``mailtls_deferred_recipients`` series, per instance."""
        self._totals: dict[InstanceKey, SessionTotals] = {}
        self._session_series: dict[InstanceKey, set[tuple[str, str]]] = {}
        """(policy, result) of each ``mailtls_tls_sessions_total`` series, per instance."""

    def soon(self, key: InstanceKey) -> None:
        """Observe now in the background, then again after ``observe_interval``."""
        state = self.ctx.states.get(key)
        if state is None or self.stopping or not self.may_act():
            return
        if state.observe_timer is not None:
            state.observe_timer.cancel()
            state.observe_timer = None
        if state.observer is not None and not state.observer.done():
            state.observe_again = True
            return
        state.observer = asyncio.get_running_loop().create_task(self._observe(key),
                                                                name=f"mailtls:observe:{key}")

    def busy(self) -> bool:
        """Is an observation running (tests wait for quiet)?"""
        return any(s.observer is not None and not s.observer.done()
                   for s in list(self.ctx.states.values()))

    async def stop(self) -> None:
        self.stopping = True
        for state in self.ctx.states.values():
            if state.observe_timer is not None:
                state.observe_timer.cancel()
            await cancel_and_wait(state.observer)

    async def _observe(self, key: InstanceKey) -> None:
        state = self.ctx.states.get(key)
        if state is None:
            return
        again = True
        while again and state.tables is not None and not self.stopping:
            state.observe_again = False
            try:
                if await self._observe_once(key, state, state.tables):
                    await self.write_statuses(key[0])
                    if self.discovery is not None:
                        self.discovery.probed(key[0], state.seen.probes)
            except Exception:
                log.exception("observing %s/%s failed", *key)
            again = state.observe_again
        interval = self.ctx.config.observe_interval
        if interval > 0 and not self.stopping:
            state.observe_timer = asyncio.get_running_loop().call_later(
                interval, self.soon, key)

    async def _observe_once(self, key: InstanceKey, state: InstanceState,
                            tables: Tables) -> bool:
        """One cycle: one ``postconf`` snapshot (when probes are due) shared by the queue
        attribution and the probes.  Returns whether anything new was seen."""
        ctx, cfg = self.ctx, self.ctx.config
        if ctx.strategy_of(key) == AGENT:  # the agents probed and released: their reports
            view = agent_view(ctx.world.pods_of(key), tables.revision)
            outcomes = merge_keys(r for _, r in view.outcomes)
            window = max((r.window_seconds for _, r in view.outcomes), default=0)
            error = next((r.error for _, r in view.outcomes if r.error), "")
            seen = state.seen
            changed = view.probes != seen.probes or view.deferred != seen.deferred or (
                outcomes, window, error) != (seen.outcomes, seen.outcome_window,
                                             seen.collector_error)
            seen.probes, seen.deferred = dict(view.probes), view.deferred
            seen.outcomes, seen.outcome_window, seen.collector_error = outcomes, window, error
            seen.released = view.released
            state.changed_keys.clear()
            self._deferred_metrics(key, tables, view.deferred)
            self._probe_metrics(key, seen.probes)
            self._session_metrics(key, tables, view.outcomes)
            return changed
        ready = [p for p in ctx.world.pods_of(key) if p.ready]
        if not ready or state.facts is None:
            return False
        pods = [ctx.target(p).pod for p in ready]
        now = ctx.clock()
        found = self.discovery.entries_for(key) if self.discovery else []
        policies = [p for p in ctx.world.policies_for(key) + found
                    if p.mode == "audit" or cfg.probe_enforced]
        due = due_probes(policies, state.seen.probes, now, cfg.observe_interval)
        if due:
            try:
                state.facts = await read_facts(ctx.runner, pods[0])
            except Exception as exc:
                log.warning("%s: cannot read the client's TLS defaults, no probes: %s",
                            pods[0], exc)
                due = []
        facts = state.facts
        release = set(state.changed_keys)
        deferred, released = await observe_queues(ctx.runner, pods, facts.routing,
                                                  tables.tls_entries, release,
                                                  timeout=cfg.exec_timeout)
        state.changed_keys -= release
        state.seen.released += released
        probes = await probe_policies(ctx.runner, pods[0], due, facts.client, now,
                                      concurrency=cfg.probe_concurrency,
                                      timeouts=cfg.probe_timeouts) if due else {}
        for ref in list(state.seen.probes):
            if not any(p.ref == ref for p in policies):
                del state.seen.probes[ref]
        changed = bool(probes) or deferred != state.seen.deferred
        state.seen.probes.update(probes)
        state.seen.deferred = deferred
        self._deferred_metrics(key, tables, deferred)
        self._probe_metrics(key, state.seen.probes)
        return changed

    def _deferred_metrics(self, key: InstanceKey, tables: Tables,
                          deferred: Mapping[str, DeferredSummary]) -> None:
        """``mailtls_deferred_recipients``: a series only for a policy that has deferred
        mail (10,000 policies with none cost no series), removed when it has none."""
        ns, inst = key
        counts: dict[str, int] = {}
        for table_key, summary in deferred.items():
            ref = tables.owners.get(table_key)
            if ref is not None:
                counts[ref] = counts.get(ref, 0) + summary.recipients
        gauge = self.ctx.metrics.deferred
        for ref in self._series.get(key, set()) - set(counts):
            with contextlib.suppress(KeyError):
                gauge.remove(ns, ref.split("/", 1)[1], inst)
        for ref, recipients in counts.items():
            gauge.labels(ns, ref.split("/", 1)[1], inst).set(recipients)
        self._series[key] = set(counts)

    def _session_metrics(self, key: InstanceKey, tables: Tables,
                         reports: Sequence[tuple[str, OutcomeReport]]) -> None:
        """``mailtls_tls_sessions_total``: the sessions each policy's lines governed, by
        result; a series only once a policy had traffic, removed when the policy is gone.
        Sessions under no policy's line (the global default, an audit policy's key) are
        not counted: no policy governed them."""
        ns, inst = key
        totals = self._totals.setdefault(key, SessionTotals())
        grew = totals.increments(reports, [p.uid for p in self.ctx.world.pods_of(key)])
        counter = self.ctx.metrics.tls_sessions
        series = self._session_series.setdefault(key, set())
        policies = self.ctx.world.policies.get(ns, {})
        for (table_key, result), n in grew.items():
            owner = tables.owners.get(table_key)
            name = owner.split("/", 1)[1] if owner and owner.startswith(f"{ns}/") else None
            if name is None or name not in policies:
                continue  # a discovered entry's line, or nothing governed it
            counter.labels(ns, name, inst, result).inc(n)
            series.add((name, result))
        for name, result in [s for s in series if s[0] not in policies]:
            with contextlib.suppress(KeyError):
                counter.remove(ns, name, inst, result)
            series.discard((name, result))

    def _probe_metrics(self, key: InstanceKey, probes: Mapping[str, PolicyProbes]) -> None:
        """``mailtls_probe_failures``: per policy, the destinations whose last probe failed
        (the most any one instance saw); a series only while some fail, like deferred."""
        ns = key[0]
        before = self._probe_failed.get(key, {})
        now = {ref: n for ref, pp in probes.items()
               if (n := sum(1 for o in pp.outcomes if o.failed))}
        self._probe_failed[key] = now
        gauge = self.ctx.metrics.probe_failures
        for ref in before.keys() | now.keys():
            seen = [f[ref] for k, f in self._probe_failed.items() if k[0] == ns and ref in f]
            policy = ref.split("/", 1)[-1]
            if seen:
                gauge.labels(ns, policy).set(max(seen))
            else:
                with contextlib.suppress(KeyError):
                    gauge.remove(ns, policy)
