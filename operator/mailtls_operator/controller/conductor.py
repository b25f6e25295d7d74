"""The conductor: wires the parts and runs one instance's convergence top-down.

Level-based, as Kopf's author recommends (docs/reconciliation.rst): the
handlers only record what they saw in :class:`~..world.World` and wake the
workers of the instances it touches.  A worker (:mod:`.worker`) debounces,
then :meth:`Operator.converge` computes the wanted table from the world and
walks down: trust-anchor check (:mod:`.trust`), render, ConfigMap
(:mod:`.store`), pods (:mod:`.rollouts`), routing lint (:mod:`..routing`),
status (:mod:`.statuses`), observation (:mod:`.observing`).  Nothing is
edge-triggered, so a restart, a missed event or a hand-edited ConfigMap all
end the same way.  No finalizers: deleting a policy never waits for the operator.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from .. import routing
from ..agent.collect import STRATEGY as AGENT
from ..agent.desired import AGENT_DATA, agent_data
from ..configmap import MANAGED_BY, OPERATOR
from ..crd import GROUP, PLURAL
from ..discovery.service import DiscoveryService
from ..facts import read_facts
from ..kube import Kube
from ..leader import LeaderElector
from ..memory import Trimmer
from ..metrics import Metrics
from ..podrunner import PodRunner
from ..render import Tables, render
from ..status import UNSAFE_ENTRY
from ..versionlint import VersionLint
from ..world import INSTANCE_LABEL, InstanceKey, World
from .context import RESTART, Config, Context, cancel_and_wait, utcnow
from .observing import Observations
from .rollouts import PodRollouts, RolloutResult
from .state import InstanceState
from .statuses import Statuses
from .store import ConfigMapStore
from .trust import check_trust_anchors
from .worker import InstanceWorker

log = logging.getLogger("mailtls.controller")


class CrdMissing(Exception):
    """The MailTLSPolicy CRD is not installed: the operator cannot start (never retried)."""


class Operator:
    """The operator's state and behaviour, independent of how Kopf delivers events."""

    def __init__(self, kube: Kube, runner: PodRunner, config: Config | None = None, *,
                 clock: Callable[[], datetime] = utcnow, metrics: Metrics | None = None,
                 leader: LeaderElector | None = None) -> None:
        cfg = config or Config()
        self.ctx = Context(kube, runner, cfg, clock, metrics or Metrics(),
                           World(clock=clock, max_exception=cfg.max_exception))
        self.leader = leader
        self.store = ConfigMapStore(kube, self.ctx.world, extra_data=self._agent_data)
        self.rollouts = PodRollouts(self.ctx)
        self.statuses = Statuses(self.ctx)
        # events and idle workers/status writer are work; quiet after it, memory is trimmed
        self.trimmer = Trimmer(ready=lambda: self.converged)
        self.statuses.writer.on_idle = self.trimmer.work
        self.discovery = DiscoveryService(  # MailTLSDiscovery (issue 16)
            wake=lambda ns: self.wake({k for k in self.world.instances() if k[0] == ns}),
            write_status=kube.patch_discovery_status, post_event=kube.post_event,
            clock=clock, registry=self.ctx.metrics.registry)
        self.versions = VersionLint()
        self.observations = Observations(self.ctx, self.statuses.write_statuses,
                                         lambda: self.may_act, self.discovery)
        self.workers: dict[InstanceKey, InstanceWorker] = {}
        self.started = False
        self._leader_task: asyncio.Task[None] | None = None
        self._resync: asyncio.TimerHandle | None = None
        self._stopping = False
        self._gone: dict[tuple[str, str], str] = {}
        """resourceVersion of each gone policy's DELETED event (a live one's: its record)."""
        self.ctx.metrics.leader.set_function(lambda: float(self.may_act))

    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def world(self) -> World:
        return self.ctx.world

    @property
    def states(self) -> dict[InstanceKey, InstanceState]:
        return self.ctx.states

    @property
    def runner(self) -> PodRunner:
        return self.ctx.runner

    @runner.setter
    def runner(self, runner: PodRunner) -> None:
        """Swap the pod runner before start (tests put a refusing or recording one)."""
        self.ctx.runner = runner

    # --------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Check the CRD, seed the world with one list per kind, converge everything."""
        kube = self.ctx.kube
        if not await kube.crd_present():
            raise CrdMissing(
                f"the CRD {PLURAL}.{GROUP} is not installed in this cluster: install it "
                "with the Helm chart or `kubectl apply -f crds/` first (the operator never "
                "creates it)")
        scopes: list[str | None] = list(self.config.namespaces) or [None]
        for ns in scopes:
            async for obj in kube.list_policies(ns):
                self.world.upsert_policy(obj)
            async for obj in kube.list_pods(ns, INSTANCE_LABEL):
                self.world.upsert_pod(obj)
            async for obj in kube.list_configmaps(ns, f"{MANAGED_BY}={OPERATOR}"):
                self.store.record(obj)
        self.started = True
        self._schedule_resync()
        if self.leader is not None:
            self._leader_task = asyncio.get_running_loop().create_task(
                self.leader.run(self._on_leadership), name="mailtls:leader")
        log.info("seeded: %d policies, %d Postfix pods, %d instances",
                 sum(1 for _ in self.world.records()), len(self.world.pods),
                 len(self.world.instances()))
        self.wake(self.world.instances() | self.store.instances())

    def _schedule_resync(self) -> None:
        """Re-converge everything now and then: drift nobody told us about (a table
        changed inside a pod by hand is seen by the next rollout's verify) ends here."""
        if self.config.resync_interval > 0 and not self._stopping:
            def tick() -> None:
                for state in self.states.values():
                    state.check_live = True
                self.wake_all()
                self._schedule_resync()
            self._resync = asyncio.get_running_loop().call_later(self.config.resync_interval,
                                                                 tick)

    @property
    def may_act(self) -> bool:
        """Only the leader writes (with leader election); everyone keeps the world warm."""
        return self.leader is None or self.leader.is_leader

    def _on_leadership(self, leading: bool) -> None:
        if leading:
            self.wake_all()  # a takeover resumes whatever the last leader left
            for key in list(self.states):
                self.observations.soon(key)
        else:  # abandon in-flight work cleanly: staged files are re-staged next time
            for worker in self.workers.values():
                worker.abandon()

    async def stop(self) -> None:
        self._stopping = True
        self.trimmer.stop()
        await self.discovery.stop()
        if self._resync is not None:
            self._resync.cancel()
        await cancel_and_wait(self._leader_task)
        await asyncio.gather(*(w.stop() for w in self.workers.values()))
        await self.statuses.stop()
        await self.observations.stop()
        if self.leader is not None:
            await self.leader.release()

    def wake(self, keys: set[InstanceKey]) -> None:
        if not self.started or self._stopping or not self.may_act:
            return
        for key in keys:
            worker = self.workers.get(key)
            if worker is None:
                worker = self.workers[key] = InstanceWorker(key, self.config, self.converge,
                                                            self.trimmer.work)
            worker.wake()

    def wake_all(self) -> None:
        """Re-converge every instance (a resync, or a test that moved the clock)."""
        self.wake(self.world.instances() | set(self.states) | self.store.instances())

    @property
    def converged(self) -> bool:
        """Started, no worker with pending work and every status written (observations
        may still run: the bench waits on this while thousands of probes go on)."""
        return (self.started and all(w.idle.is_set() for w in list(self.workers.values()))
                and self.statuses.writer.idle.is_set())

    @property
    def idle(self) -> bool:
        """The operator's idle signal: :attr:`converged`, and no status offer (with its
        Event) or observation in flight.  Tests and the demo wait on it instead of
        sleeping."""
        return self.converged and not self.statuses.busy() and not self.observations.busy()

    def has_seen(self, namespace: str, name: str, resource_version: str) -> bool:
        """Has the policy event of ``resource_version`` (or a later one) been handled?"""
        rec = self.world.policies.get(namespace, {}).get(name)
        seen = rec.resource_version if rec is not None else self._gone.get((namespace, name))
        if seen is None:
            return False
        if seen.isdigit() and resource_version.isdigit():
            return int(seen) >= int(resource_version)
        return seen == resource_version

    async def wait_idle(self, timeout: float = 30.0) -> None:
        """Until no worker has pending work and every status is written."""
        deadline = time.monotonic() + timeout
        while True:
            busy = [w.idle for w in self.workers.values() if not w.idle.is_set()]
            if not self.statuses.writer.idle.is_set():
                busy.append(self.statuses.writer.idle)
            if not busy:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"workers or status writes still busy: {len(busy)}")
            await asyncio.wait([asyncio.ensure_future(e.wait()) for e in busy], timeout=left)

    # ------------------------------------------------------------------ events

    def known(self, event_type: str | None, namespace: str, name: str,
              resource_version: str) -> bool:
        """An event for a version already recorded (the replay after a restart's own
        list): marked seen and skipped before its body is even copied."""
        if event_type == "DELETED" or not self.world.holds(namespace, name, resource_version):
            return False
        self.trimmer.work()  # a restart's replay: its decoded events are freed after it
        return True

    def on_policy(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        if event_type == "DELETED":
            keys = self.world.delete_policy(ns, name)
            self._gone[(ns, name)] = str(meta.get("resourceVersion") or "")
            self.statuses.forget(f"{ns}/{name}")
        else:
            self._gone.pop((ns, name), None)
            keys = self.world.upsert_policy(body)
        self.trimmer.work()
        self.wake(keys)

    def on_pod(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        if event_type == "DELETED":
            keys = self.world.delete_pod(meta.get("namespace", ""), meta.get("name", ""))
        else:
            keys = self.world.upsert_pod(body)
        self.wake(keys)

    def on_configmap(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Our ConfigMap changed or vanished: if it is not what we want, converge again."""
        key = self.store.observe(event_type, body, self._tables_of)
        if key is not None:
            self.wake({key})

    def _agent_data(self, key: InstanceKey) -> dict[str, str]:
        """Agent mode: what the agents probe and check is desired state in the ConfigMap."""
        if self.ctx.strategy_of(key) != AGENT:
            return {}
        return {AGENT_DATA: agent_data(self.world.policies_for(key),
                                       lambda p: p.mode == "audit",
                                       probe_enforced=self.config.probe_enforced)}

    def _tables_of(self, key: InstanceKey) -> Tables | None:
        state = self.states.get(key)
        return state.tables if state is not None else None

    # -------------------------------------------------------------- converging

    async def converge(self, key: InstanceKey) -> None:
        """Make the instance's ConfigMap, pods and its policies' status match the world."""
        if not self.may_act:
            return
        ns, inst = key
        metrics = self.ctx.metrics
        state = self.states.setdefault(key, InstanceState(key))
        now = self.ctx.clock()
        if key not in self.world.instances():
            await self.store.retire(key)
            self.states.pop(key, None)
            await self.statuses.write_statuses(ns)
            return
        # this converge's warnings are gathered apart and replace the last ones only at
        # the end: a status written meanwhile (a pending rollout, another instance of the
        # namespace, an observation) keeps showing the last ones, instead of losing them
        # for a moment and posting their Warning Event again when they come back
        warnings: dict[str, list[tuple[str, str]]] = {}
        policies = self.world.policies_for(key) + self.discovery.entries_for(key)
        rendered = {p.ref: p.generation for p in policies}
        trust = await check_trust_anchors(self.ctx, key, state, policies)
        for ref, found in trust.found.items():
            warnings.setdefault(ref, []).append(found)
        if trust.retry:
            self.workers[key].wake_later(self.config.retry_base)
        pod = next((p for p in self.world.pods_of(key) if p.ready), None)  # version lint
        # by exec; restart and agent never exec: the facts agents reported (restart: none)
        exec_ok = pod is not None and self.ctx.strategy_of(key) not in (RESTART, AGENT)
        too_new = await self.versions.hold(self.ctx.runner, key, (
            self.ctx.target(pod).pod, pod.uid) if pod and exec_ok else None, policies,
            warnings, state.facts if self.ctx.strategy_of(key) == AGENT else None)
        policies = [p for p in policies if not trust.held(p.ref) and p.ref not in too_new]
        started = time.perf_counter()
        tables = render(policies, instance=key, now=now, smtputf8=state.smtputf8)
        for ref, why in tables.refused.items():
            log.error("%s: lines not written to %s/%s: %s", ref, ns, inst, why)
            warnings.setdefault(ref, []).append((UNSAFE_ENTRY, why))
        metrics.render_seconds.observe(time.perf_counter() - started)
        state.renders += 1
        state.rendered = rendered
        state.note_revision(tables, lambda ref: self.statuses.recorded(ref, inst))
        if state.tables is not None:
            old, new = state.tables.tls_entries, tables.tls_entries
            state.unreleased |= {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
        state.tables = tables
        metrics.entries.labels(ns, inst).set(len(tables.tls_entries) - 1)
        stored = await self.store.write(key, tables)
        if stored.failure:
            state.failure = stored.failure
        if stored.wrote:
            state.configmap_writes += 1
            metrics.configmap_writes.labels(ns, inst).inc()
        await self._roll_out(key, state, tables, warnings)
        state.warnings = warnings
        if not state.failure:  # the new lines are live in every ready pod: release now
            state.changed_keys |= state.unreleased
            state.unreleased.clear()
        await self.statuses.write_statuses(ns)
        self.discovery.rendered(ns, tables, state.warnings)
        self._schedule_expiry(key, now)
        self.observations.soon(key)

    async def _roll_out(self, key: InstanceKey, state: InstanceState, tables: Tables,
                        warnings: dict[str, list[tuple[str, str]]]) -> None:
        ns, inst = key
        metrics = self.ctx.metrics

        def pending(updated: int) -> None:
            # say so while a long rollout runs (Pending, pods still to do), without making
            # the rollout wait for thousands of status writes
            state.pods_updated = updated
            self.statuses.spawn(self.statuses.write_statuses(ns))

        started = time.perf_counter()
        result = await self.rollouts.roll(key, tables, check_live=state.check_live,
                                          quiet=bool(state.failure), on_pending=pending)
        self._record(state, result)
        if not result.pods_total:
            return
        if result.strategy != RESTART:
            state.check_live = False
            await self._lint(key, state, result, tables, warnings)
        metrics.rollout_seconds.observe(time.perf_counter() - started)
        metrics.pods_behind.labels(ns, inst).set(state.pods_total - state.pods_updated)
        if state.failure:
            state.failures += 1
            metrics.rollout_failures.labels(ns, inst).inc()
            delay = min(self.config.retry_max,
                        self.config.retry_base * 2 ** (state.failures - 1))
            log.warning("rollout of %s/%s stopped: %s; retrying in %.1fs", ns, inst,
                        state.failure, delay)
            self.workers[key].wake_later(delay)
        else:
            state.failures = 0

    def _record(self, state: InstanceState, result: RolloutResult) -> None:
        state.pods_total, state.pods_updated = result.pods_total, result.pods_updated
        state.failure, state.note = result.failure, result.note
        if result.changed:
            state.rollouts += 1

    async def _lint(self, key: InstanceKey, state: InstanceState, result: RolloutResult,
                   tables: Tables, warnings: dict[str, list[tuple[str, str]]]) -> None:
        """After a clean exec rollout: re-read the instance's facts if a pod changed (one
        ``postconf``), then warn about keys its routing never looks up."""
        if not result.ready or result.failure:
            return
        if result.strategy == AGENT:  # what the pods' agents reported: nothing is run
            state.facts = result.facts or state.facts
        elif result.changed or state.facts is None:
            try:
                state.facts = await read_facts(self.ctx.runner,
                                               self.ctx.target(result.ready[0]).pod)
            except Exception as exc:  # a lint must never stop a rollout
                log.warning("%s/%s: could not read postconf: %s", *key, exc)
                state.facts = None
        if state.facts is not None:
            for ref, found in routing.lint(tables.contributors, tables.transport_entries,
                                           state.facts.routing).items():
                warnings.setdefault(ref, []).extend(found)

    def _schedule_expiry(self, key: InstanceKey, now: datetime) -> None:
        expiries = [t for p in self.world.policies_for(key) if p.exception is not None
                    for t in (p.exception.starts_at, p.exception.expires_at) if t > now]
        if expiries:
            delay = (min(expiries) - now).total_seconds()
            self.workers[key].wake_later(max(0.0, delay) + 0.01)
