"""The controller: Kopf handlers feed the world; one worker per instance converges it.

Level-based, as Kopf's author recommends (docs/reconciliation.rst): handlers
only record what they saw in :class:`~.world.World` and wake the workers of the
instances it touches.  A worker waits for a quiet period (bounded by a
maximum delay), so a burst of 1,000 applies becomes one render, at most one
ConfigMap write and one rollout; then it computes the wanted table from the
world and converges: ConfigMap, pods, status.  Nothing here is edge-triggered,
so a restart, a missed event or a hand-edited ConfigMap all end the same way.

No finalizers: deleting a policy (or its namespace) never waits for the
operator; the worker simply renders the table without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf

from . import mailqueue, postfix, probe, rollout
from .agent.collect import STRATEGY as AGENT
from .agent.collect import agent_trust_anchors, agent_view
from .agent.desired import AGENT_DATA, agent_data
from .configmap import (
    ANN_REVISION,
    LABEL_INSTANCE,
    MANAGED_BY,
    OPERATOR,
    TableTooLarge,
    configmap_bodies,
    configmap_name,
    is_own_name,
    merge_patch,
    part_number,
    same_content,
    stale_parts,
)
from .crd import GROUP, KIND, PLURAL, VERSION
from .kube import Conflict, Kube, NotFound
from .leader import LeaderElector
from .metrics import Metrics
from .observer import (
    Observations,
    observe_queues,
    probe_policies,
    probe_status,
    verified_condition,
)
from .podrunner import PodRef, PodRunner
from .policy import DEFAULT_MAX_EXCEPTION, Policy
from .render import REVISION_KEY, Tables, render
from .status import (
    CHECK_UNAVAILABLE,
    PENDING,
    TRUST_ANCHOR_MISSING,
    TRUST_ANCHOR_UNCHECKED,
    UNSAFE_ENTRY,
    Condition,
    InstanceView,
    event_type,
    policy_status,
    transitions,
)
from .statuswriter import StatusWriter
from .workloads import restart_rollout
from .world import (
    ANN_APPLIED,
    ANN_CONTAINER,
    ANN_MAP_PATH,
    ANN_MAP_TYPE,
    ANN_RELOAD,
    ANN_STRATEGY,
    ANN_TEMPLATE_REVISION,
    INSTANCE_LABEL,
    InstanceKey,
    PodRecord,
    PolicyRecord,
    World,
)

log = logging.getLogger("mailtls.controller")


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
class InstanceState:
    """What a worker knows about its instance after the last convergence."""

    key: InstanceKey
    tables: Tables | None = None
    pods_total: int = 0
    pods_updated: int = 0
    failure: str | None = None
    failures: int = 0
    warnings: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    note: str = ""
    renders: int = 0
    configmap_writes: int = 0
    rollouts: int = 0
    trust_anchors: tuple[tuple[str, ...], str, frozenset[str]] | None = None
    """(paths checked, pod uid, missing): tafile checks are redone only when either changes."""
    config: rollout.InstanceConfig | None = None
    """The instance's routing (postconf), re-read after each rollout that changed a pod."""
    seen: Observations = field(default_factory=Observations)
    unreleased: set[str] = field(default_factory=set)
    """Keys whose line changed in a render that is not yet rolled out everywhere."""
    changed_keys: set[str] = field(default_factory=set)
    """Keys whose changed line is live in every ready pod: their deferred mail is released."""
    observer: asyncio.Task[None] | None = None
    observe_again: bool = False
    check_live: bool = False
    rendered: dict[str, int] = field(default_factory=dict)
    """policy ref -> the generation the current tables were rendered from: a policy newer
    than the render is Pending, whatever the pods say."""
    seq: dict[str, int] = field(default_factory=dict)
    """Order of the revisions rendered since start (revision -> sequence number)."""
    since: dict[str, tuple[tuple[str, ...], str]] = field(default_factory=dict)
    """policy ref -> (its lines, the revision that first carried them): a policy is live in
    a pod whose revision is that one or later, so a change to *another* policy neither
    makes it Pending nor rewrites its status."""

    def note_revision(self, tables: Tables,
                      recorded: Callable[[str], tuple[list[str], str] | None]) -> None:
        """Record which revision introduced each policy's current lines.  A policy seen for
        the first time (e.g. after a restart) keeps the revision its status recorded when
        its lines are still the same, so a restart rewrites no status."""
        if tables.revision not in self.seq:
            self.seq[tables.revision] = len(self.seq)
        for ref, lines in tables.contributors.items():
            key = tuple(lines)
            if ref in self.since and self.since[ref][0] == key:
                continue
            known = recorded(ref) if ref not in self.since else None
            revision = tables.revision
            if known is not None and known[1] and set(key) <= set(known[0]):
                revision = known[1]
            self.since[ref] = (key, revision)
        for ref in set(self.since) - set(tables.contributors):
            del self.since[ref]

    def live_in(self, pod_revision: str | None, revision: str) -> bool:
        """Does a pod on ``pod_revision`` carry the lines ``revision`` introduced?  The
        current revision carries every current line; otherwise revisions are ordered by
        when this operator rendered them (unknown ones are not trusted)."""
        if pod_revision is None:
            return False
        if self.tables is not None and pod_revision == self.tables.revision:
            return True
        if pod_revision not in self.seq:
            return False
        return self.seq[pod_revision] >= self.seq.get(revision, len(self.seq))
    """Verify pods' live revision on the next rollout (set by the periodic resync)."""
    observe_timer: asyncio.TimerHandle | None = None

    @property
    def revision(self) -> str:
        return self.tables.revision if self.tables else ""


class InstanceWorker:
    """Debounces changes to one instance and converges it, one run at a time."""

    def __init__(self, operator: Operator, key: InstanceKey) -> None:
        self.operator = operator
        self.key = key
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

    async def _debounce(self) -> None:
        cfg = self.operator.config
        deadline = time.monotonic() + cfg.max_delay
        while True:
            self.dirty.clear()
            remaining = min(cfg.debounce, deadline - time.monotonic())
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self.dirty.wait(), remaining)
            except TimeoutError:
                return

    async def _loop(self) -> None:
        while True:
            await self._debounce()
            try:
                await self.operator.converge(self.key)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("converging %s/%s failed; retrying", *self.key)
                self.wake_later(self.operator.config.retry_base)
            if not self.dirty.is_set():
                self.idle.set()
                await self.dirty.wait()
                self.idle.clear()

    async def stop(self) -> None:
        if self.retry_handle is not None:
            self.retry_handle.cancel()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


class Operator:
    """The operator's state and behaviour, independent of how Kopf delivers events."""

    def __init__(self, kube: Kube, runner: PodRunner, config: Config | None = None, *,
                 clock: Callable[[], datetime] = utcnow, metrics: Metrics | None = None,
                 leader: LeaderElector | None = None) -> None:
        self.kube = kube
        self.leader = leader
        self._leader_task: asyncio.Task[None] | None = None
        self._resync: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.runner = runner
        self.config = config or Config()
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.world = World(clock=clock, max_exception=self.config.max_exception)
        self.states: dict[InstanceKey, InstanceState] = {}
        self.workers: dict[InstanceKey, InstanceWorker] = {}
        self.started = False
        self.status_writer = StatusWriter(
            self._write_status, qps=self.config.status_qps, burst=self.config.status_burst,
            retry_base=self.config.retry_base, retry_max=self.config.retry_max,
            describe=_one_line,
            on_failure=lambda rec: self.metrics.status_write_failures.labels(
                rec.namespace).inc())
        self._io = asyncio.Semaphore(16)
        self._stopping = False

    # --------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Check the CRD, seed the world with one list per kind, converge everything."""
        if not await self.kube.crd_present():
            raise kopf.PermanentError(
                f"the CRD {PLURAL}.{GROUP} is not installed in this cluster: install it "
                "with the Helm chart or `kubectl apply -f crds/` first (the operator never "
                "creates it)")
        scopes: list[str | None] = list(self.config.namespaces) or [None]
        for ns in scopes:
            for obj in await self.kube.list_policies(ns):
                self.world.upsert_policy(obj)
            for obj in await self.kube.list_pods(ns, INSTANCE_LABEL):
                self.world.upsert_pod(obj)
            for obj in await self.kube.list_configmaps(ns, f"{MANAGED_BY}={OPERATOR}"):
                self._record_configmap(obj)
        self.started = True
        self._schedule_resync()
        if self.leader is not None:
            self._leader_task = asyncio.get_running_loop().create_task(
                self.leader.run(self._on_leadership), name="mailtls:leader")
        log.info("seeded: %d policies, %d Postfix pods, %d instances",
                 sum(1 for _ in self.world.records()), len(self.world.pods),
                 len(self.world.instances()))
        self.wake(self.world.instances() | self._configmap_instances())

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
                self.observe_soon(key)
        else:  # abandon in-flight work cleanly: staged files are re-staged next time
            for worker in self.workers.values():
                if worker.task is not None:
                    worker.task.cancel()
                worker.idle.set()

    async def stop(self) -> None:
        self._stopping = True
        if self._resync is not None:
            self._resync.cancel()

        if self._leader_task is not None:
            self._leader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._leader_task
        await asyncio.gather(*(w.stop() for w in self.workers.values()))
        await self.status_writer.stop()
        for task in list(self._background):
            task.cancel()
        for state in self.states.values():
            if state.observe_timer is not None:
                state.observe_timer.cancel()
            if state.observer is not None:
                state.observer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await state.observer
        if self.leader is not None:
            await self.leader.release()

    def wake(self, keys: set[InstanceKey]) -> None:
        if not self.started or self._stopping or not self.may_act:
            return
        for key in keys:
            worker = self.workers.get(key)
            if worker is None:
                worker = self.workers[key] = InstanceWorker(self, key)
            worker.wake()

    def wake_all(self) -> None:
        """Re-converge every instance (a resync, or a test that moved the clock)."""
        self.wake(self.world.instances() | set(self.states) | self._configmap_instances())

    async def wait_idle(self, timeout: float = 30.0) -> None:
        """Until no worker has pending work (tests and the demo use this)."""
        deadline = time.monotonic() + timeout
        while True:
            busy = [w.idle for w in self.workers.values() if not w.idle.is_set()]
            if not self.status_writer.idle.is_set():
                busy.append(self.status_writer.idle)
            if not busy:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"workers or status writes still busy: {len(busy)}")
            await asyncio.wait([asyncio.ensure_future(e.wait()) for e in busy], timeout=left)

    # ------------------------------------------------------------------ events

    def on_policy(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        if event_type == "DELETED":
            keys = self.world.delete_policy(meta.get("namespace", ""), meta.get("name", ""))
            self.status_writer.forget(f"{meta.get('namespace', '')}/{meta.get('name', '')}")
        else:
            keys = self.world.upsert_policy(body)
        self.wake(keys)

    def on_pod(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        if event_type == "DELETED":
            keys = self.world.delete_pod(meta.get("namespace", ""), meta.get("name", ""))
        else:
            keys = self.world.upsert_pod(body)
        self.wake(keys)

    def _record_configmap(self, body: Mapping[str, Any]) -> InstanceKey | None:
        meta = body.get("metadata") or {}
        inst = (meta.get("labels") or {}).get(LABEL_INSTANCE)
        ns, name = meta.get("namespace", ""), meta.get("name", "")
        if not inst or not is_own_name(name, inst):
            return None
        self.world.configmaps[(ns, name)] = dict(body)
        return (ns, inst)

    def on_configmap(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Our ConfigMap changed or vanished: if it is not what we want, converge again."""
        meta = body.get("metadata") or {}
        ns, name = meta.get("namespace", ""), meta.get("name", "")
        if event_type == "DELETED":
            self.world.configmaps.pop((ns, name), None)
            inst = (meta.get("labels") or {}).get(LABEL_INSTANCE)
            key = (ns, inst) if inst else None
        else:
            key = self._record_configmap(body)
        if key is None:
            return
        state = self.states.get(key)
        current = self.world.configmaps.get((ns, name))
        if state is None or state.tables is None or key not in self.world.instances():
            self.wake({key})
            return
        try:
            bodies = configmap_bodies(ns, key[1], state.tables)
        except TableTooLarge:
            return
        self._add_agent_data(key, bodies)
        wanted = {b["metadata"]["name"]: b for b in bodies}
        restore = (not same_content(current, wanted[name]) if name in wanted
                   else current is not None)  # a stale part: the worker deletes it
        if restore:
            log.info("ConfigMap %s/%s was changed or deleted by hand; restoring", ns, name)
            self.wake({key})

    def _configmap_instances(self) -> set[InstanceKey]:
        out = set()
        for (ns, _), cm in self.world.configmaps.items():
            inst = ((cm.get("metadata") or {}).get("labels") or {}).get(LABEL_INSTANCE)
            if inst:
                out.add((ns, inst))
        return out

    # -------------------------------------------------------------- converging

    async def converge(self, key: InstanceKey) -> None:
        """Make the instance's ConfigMap, pods and its policies' status match the world."""
        if not self.may_act:
            return
        ns, inst = key
        state = self.states.setdefault(key, InstanceState(key))
        now = self.clock()
        if key not in self.world.instances():
            await self._retire(key)
            return
        state.warnings = {}
        policies = self.world.policies_for(key)
        rendered = {p.ref: p.generation for p in policies}
        held = await self._missing_trust_anchors(key, state, policies)
        for ref, (reason, message) in held.items():
            state.warnings.setdefault(ref, []).append((reason, message))
        policies = [p for p in policies if p.ref not in held or held[p.ref][0] not in
                    (TRUST_ANCHOR_MISSING, CHECK_UNAVAILABLE)]
        started = time.perf_counter()
        tables = render(policies, instance=key, now=now)
        for ref, why in tables.refused.items():
            log.error("%s: lines not written to %s/%s: %s", ref, ns, inst, why)
            state.warnings.setdefault(ref, []).append((UNSAFE_ENTRY, why))
        self.metrics.render_seconds.observe(time.perf_counter() - started)
        state.renders += 1
        state.rendered = rendered
        state.note_revision(tables, lambda ref: self._recorded(ref, inst))
        if state.tables is not None:
            old, new = state.tables.tls_entries, tables.tls_entries
            state.unreleased |= {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
        state.tables = tables
        self.metrics.entries.labels(ns, inst).set(len(tables.tls_entries) - 1)
        await self._write_configmap(key, state, tables)
        await self._roll_out(key, state, tables)
        if not state.failure:  # the new lines are live in every ready pod: release now
            state.changed_keys |= state.unreleased
            state.unreleased.clear()
        await self.write_statuses(ns)
        self._schedule_expiry(key, now)
        self.observe_soon(key)

    def _own_configmaps(self, ns: str, inst: str) -> list[str]:
        """Names of the instance's ConfigMaps we know of: the primary first, then parts."""
        parts = sorted((n for (s, n) in self.world.configmaps
                        if s == ns and part_number(n, inst)),
                       key=lambda n: part_number(n, inst) or 0)
        primary = configmap_name(inst)
        return ([primary] if (ns, primary) in self.world.configmaps else []) + parts

    async def _retire(self, key: InstanceKey) -> None:
        """An instance with neither pods nor policies naming it: remove its ConfigMaps
        (the primary first, so no manifest is left pointing at missing parts)."""
        ns, inst = key
        for name in self._own_configmaps(ns, inst):
            log.info("instance %s/%s has no pods and no policies: deleting ConfigMap %s",
                     ns, inst, name)
            await self.kube.delete_configmap(ns, name)
            self.world.configmaps.pop((ns, name), None)
        self.states.pop(key, None)
        await self.write_statuses(ns)

    async def _write_configmap(self, key: InstanceKey, state: InstanceState,
                               tables: Tables) -> None:
        """Store the tables: one ConfigMap, or past ~1 MiB compressed, parts written first and
        the primary (the manifest a pod follows) last, then parts no longer needed removed."""
        ns, inst = key
        try:
            bodies = await asyncio.to_thread(configmap_bodies, ns, inst, tables)
        except TableTooLarge as exc:
            state.failure = str(exc)
            log.error("%s", exc)
            return
        self._add_agent_data(key, bodies)
        wrote = 0
        for wanted in [*bodies[1:], bodies[0]]:
            wrote += await self._write_one(ns, wanted)
        for name in stale_parts([n for (s, n) in self.world.configmaps if s == ns], bodies):
            await self.kube.delete_configmap(ns, name)
            self.world.configmaps.pop((ns, name), None)
        if wrote:
            state.configmap_writes += 1
            self.metrics.configmap_writes.labels(ns, inst).inc()
            log.info("ConfigMap %s/%s: revision %s (%d entries%s)", ns, configmap_name(inst),
                     tables.short_revision, len(tables.tls_entries) - 1,
                     f", {len(bodies) - 1} parts" if len(bodies) > 1 else "")

    def _add_agent_data(self, key: InstanceKey, bodies: list[dict[str, Any]]) -> None:
        """Agent mode: what the agents probe is desired state too (``agent.json``)."""
        if self._strategy(key) == AGENT:
            bodies[0].setdefault("data", {})[AGENT_DATA] = agent_data(
                self.world.policies_for(key), lambda p: p.mode == "audit",
                probe_enforced=self.config.probe_enforced)

    async def _write_one(self, ns: str, wanted: dict[str, Any]) -> int:
        """Create or patch one ConfigMap unless it already holds exactly ``wanted``."""
        name = wanted["metadata"]["name"]
        current = self.world.configmaps.get((ns, name))
        if same_content(current, wanted):
            return 0
        if current is None:
            try:
                current = await self.kube.get_configmap(ns, name)
            except NotFound:
                current = None
        if current is None:
            try:
                stored = await self.kube.create_configmap(wanted)
            except Conflict:  # created meanwhile (e.g. a restart race)
                stored = await self.kube.replace_configmap_content(wanted)
        elif same_content(current, wanted):
            stored = current
        else:
            stored = await self.kube.replace_configmap_content(merge_patch(current, wanted))
        self.world.configmaps[(ns, name)] = stored
        return int(stored is not current)

    async def _roll_out(self, key: InstanceKey, state: InstanceState, tables: Tables) -> None:
        ns, inst = key
        pods = self.world.pods_of(key)
        state.pods_total = len(pods)
        state.note = "" if pods else "(no pods yet: new pods load the ConfigMap at start)"
        if not pods:
            state.pods_updated = 0
            state.failure = None
            return
        strategy = pods[0].annotation(ANN_STRATEGY, self.config.default_strategy)
        behind = [p for p in pods if p.annotations.get(
            ANN_TEMPLATE_REVISION if strategy == "restart" else ANN_APPLIED) != tables.revision]
        if behind and not state.failure:
            # say so while a long rollout runs (Pending, pods still to do), without making
            # the rollout wait for thousands of status writes
            state.pods_updated = len(pods) - len(behind)
            self._spawn(self.write_statuses(ns))
        started = time.perf_counter()
        if strategy == "restart":
            result = await restart_rollout(self.kube, pods, tables.revision)
            state.pods_updated, state.failure = result.updated, result.failure
        elif strategy == AGENT:  # no exec: the pods' agents report (DESIGN.md §11)
            view = agent_view(pods, tables.revision)
            state.pods_updated, state.failure = view.updated, view.failure
            state.config = view.config or state.config
            if state.config is not None:
                self._lint(state, state.config, tables)
        else:
            await self._exec_rollout(key, state, pods, tables)
        self.metrics.rollout_seconds.observe(time.perf_counter() - started)
        self.metrics.pods_behind.labels(ns, inst).set(state.pods_total - state.pods_updated)
        if state.failure:
            state.failures += 1
            self.metrics.rollout_failures.labels(ns, inst).inc()
            delay = min(self.config.retry_max, self.config.retry_base * 2 ** (state.failures - 1))
            log.warning("rollout of %s/%s stopped: %s; retrying in %.1fs", ns, inst,
                        state.failure, delay)
            self.workers[key].wake_later(delay)
        else:
            state.failures = 0

    def _target(self, pod: PodRecord) -> rollout.PodTarget:
        return rollout.PodTarget(
            pod=PodRef(pod.namespace, pod.name, pod.annotation(ANN_CONTAINER, "postfix")),
            map_path=pod.annotation(ANN_MAP_PATH, rollout.DEFAULT_MAP_PATH),
            map_type=pod.annotation(ANN_MAP_TYPE, rollout.DEFAULT_MAP_TYPE),
            applied_revision=pod.annotations.get(ANN_APPLIED),
            reload=pod.annotation(ANN_RELOAD, "false").lower() == "true",
        )

    async def _exec_rollout(self, key: InstanceKey, state: InstanceState,
                            pods: list[PodRecord], tables: Tables) -> None:
        ns, inst = key
        ready = [p for p in pods if p.ready]
        targets = [self._target(p) for p in ready]
        if state.check_live:
            targets = [await self._drifted(t, tables) for t in targets]
            state.check_live = False
        tableset = rollout.TableSet.of(tables)
        todo = sum(1 for t in targets if t.applied_revision != tables.revision)
        if todo:
            state.rollouts += 1
            log.info("rolling revision %s out to %d/%d pod(s) of %s/%s", tables.short_revision,
                     todo, len(pods), ns, inst)

        async def done(target: rollout.PodTarget) -> None:
            await self.kube.annotate_pod(ns, target.pod.name, {ANN_APPLIED: tables.revision})
            rec = self.world.pods.get((ns, target.pod.name))
            if rec is not None:
                rec.annotations[ANN_APPLIED] = tables.revision
            log.info("%s/%s: pod %s verified on revision %s", ns, inst, target.pod.name,
                     tables.short_revision)

        outcome = await rollout.roll_out(self.runner, targets, tableset,
                                         parallelism=self.config.parallelism,
                                         on_pod_done=done, timeout=self.config.exec_timeout)
        state.failure = outcome.failure_message()
        state.pods_updated = sum(1 for p in pods if p.annotations.get(ANN_APPLIED)
                                 == tables.revision)
        if ready and not state.failure:
            if todo or state.config is None:
                state.config = await self._read_config(key, ready[0])
            if state.config is not None:
                self._lint(state, state.config, tables)

    async def _drifted(self, target: rollout.PodTarget, tables: Tables) -> rollout.PodTarget:
        """A pod whose annotation claims the revision but whose live table answers another
        (edited by hand, restored from an old volume): roll it again."""
        if target.applied_revision != tables.revision:
            return target
        try:
            res = await self.runner.run(target.pod, postfix.postmap_query(
                REVISION_KEY, target.map_type, target.map_path), timeout=self.config.exec_timeout)
        except Exception:
            return target  # unreachable now; the rollout itself will say so next time
        live = res.stdout.decode("utf-8", "replace").strip()
        if res.ok and live == tables.revision_value():
            return target
        log.warning("%s: table drifted (revision key answers %r): rolling it again",
                    target.pod, live or res.message())
        return replace(target, applied_revision=None)

    async def _read_config(self, key: InstanceKey, pod: PodRecord
                           ) -> rollout.InstanceConfig | None:
        try:
            return await rollout.read_instance_config(self.runner, self._target(pod).pod)
        except Exception as exc:  # a lint must never stop a rollout
            log.warning("%s/%s: could not read postconf: %s", *key, exc)
            return None

    def _lint(self, state: InstanceState, config: rollout.InstanceConfig,
              tables: Tables) -> None:
        """Instance-aware checks (DESIGN.md §5, §10): keys the instance's routing never
        looks up, and dane without DNSSEC (Postfix then sends in clear text)."""
        routed = set(tables.transport_entries)
        for ref, lines in tables.contributors.items():
            keys = [ln.split(" ", 1)[0] for ln in lines]
            levels = {ln.split(" ")[1] for ln in lines}
            if levels & {"dane", "dane-only"} and config.smtp_dns_support_level != "dnssec":
                state.warnings.setdefault(ref, []).append((
                    "DNSSECDisabled",
                    f"smtp_dns_support_level is {config.smtp_dns_support_level or 'unset'!r}, "
                    "not 'dnssec': Postfix ignores dane here and sends in clear text"))
            bypassed = rollout.bypassed_keys(keys, config, routed)
            if bypassed:
                state.warnings.setdefault(ref, []).append((
                    "PolicyBypassed",
                    f"relayhost {config.relayhost} is the next-hop for {', '.join(bypassed[:5])}"
                    f"{' ...' if len(bypassed) > 5 else ''}: these keys are never looked up "
                    "(set route: direct or route the domains in transport_maps)"))

    def _strategy(self, key: InstanceKey) -> str:
        pods = self.world.pods_of(key)
        return pods[0].annotation(ANN_STRATEGY, self.config.default_strategy) if pods \
            else self.config.default_strategy

    async def _missing_trust_anchors(self, key: InstanceKey, state: InstanceState,
                                     policies: list[Policy]) -> dict[str, tuple[str, str]]:
        """Policies whose tafile the instance cannot use: ref -> (reason, message).

        Postfix defers every message to a key whose tafile it cannot open, so
        such a line must not be rolled out; the rest of the table still is.
        ``TrustAnchorMissing``: the check ran and the file is missing or unreadable;
        ``CheckUnavailable``: the check could not run (exec refused or failed), so
        the lines are held back too -- a refusal is never read as "present".  With
        the restart strategy the operator has no exec at all: nothing is run, and
        the policy says ``TrustAnchorUnchecked`` in its Ready message.
        """
        users = [p for p in policies if p.tafile]
        pod = next((p for p in self.world.pods_of(key) if p.ready), None)
        if not users or pod is None:
            return {}
        if self._strategy(key) == "restart":
            return {p.ref: (TRUST_ANCHOR_UNCHECKED,
                            f"tafile {', '.join(p.tafile)} not checked in {key[1]}: the restart "
                            "strategy does not exec into pods") for p in users}
        if self._strategy(key) == AGENT:
            return agent_trust_anchors(key[1], users, agent_view(self.world.pods_of(key), ""))
        paths = sorted({f for p in users for f in p.tafile})
        ref = self._target(pod).pod
        cached = state.trust_anchors
        if cached is not None and cached[:2] == (tuple(paths), pod.uid):
            missing, todo = set(cached[2]), []
        else:
            missing, todo = set(), paths
        unknown: dict[str, str] = {}
        for path in todo:
            try:
                res = await self.runner.run(ref, postfix.readable_by(path),
                                            timeout=self.config.exec_timeout)
                if not res.ok and (res.returncode != 1 or res.stderr.strip()):
                    # no setpriv or no user postfix in this image: at least it must exist
                    res = await self.runner.run(ref, ["test", "-r", postfix.check_map_path(path)],
                                                timeout=self.config.exec_timeout)
            except Exception as exc:
                log.warning("%s/%s: cannot check tafile %s: %s", *key, path, exc)
                unknown[path] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                continue
            if not res.ok:
                missing.add(path)
        if todo and not unknown:  # a check that could not run is tried again next time
            state.trust_anchors = (tuple(paths), pod.uid, frozenset(missing))
        out: dict[str, tuple[str, str]] = {}
        for p in users:
            if set(p.tafile) & missing:
                out[p.ref] = (TRUST_ANCHOR_MISSING, (
                    f"tafile {', '.join(sorted(set(p.tafile) & missing))} does not exist in "
                    f"pod {pod.name} or user postfix cannot read it: this policy's lines are "
                    f"held back from {key[1]} (Postfix would defer all its mail)"))
            elif set(p.tafile) & set(unknown):
                path = sorted(set(p.tafile) & set(unknown))[0]
                out[p.ref] = (CHECK_UNAVAILABLE, (
                    f"could not check tafile {path} in pod {pod.name} ({unknown[path]}): this "
                    f"policy's lines are held back from {key[1]} until the check can run"))
        if unknown:
            self.workers[key].wake_later(self.config.retry_base)
        return out

    def _schedule_expiry(self, key: InstanceKey, now: datetime) -> None:
        expiries = [t for p in self.world.policies_for(key) if p.exception is not None
                    for t in (p.exception.starts_at, p.exception.expires_at) if t > now]
        if expiries:
            delay = (min(expiries) - now).total_seconds()
            self.workers[key].wake_later(max(0.0, delay) + 0.01)

    # ---------------------------------------------------------------- observing

    def observe_soon(self, key: InstanceKey) -> None:
        """Probe and read queues now in the background (never blocking the worker), then
        again after ``observe_interval``; a request during a run makes it run once more."""
        state = self.states.get(key)
        if state is None or self._stopping or not self.may_act:
            return
        if state.observe_timer is not None:
            state.observe_timer.cancel()
            state.observe_timer = None
        if state.observer is not None and not state.observer.done():
            state.observe_again = True
            return
        state.observer = asyncio.get_running_loop().create_task(self._observe(key),
                                                                name=f"mailtls:observe:{key}")

    async def _observe(self, key: InstanceKey) -> None:
        state = self.states.get(key)
        if state is None:
            return
        again = True
        while again and state.tables is not None and not self._stopping:
            state.observe_again = False
            try:
                if await self._observe_once(key, state, state.tables):
                    await self.write_statuses(key[0])
            except Exception:
                log.exception("observing %s/%s failed", *key)
            again = state.observe_again
        interval = self.config.observe_interval
        if interval > 0 and not self._stopping:
            state.observe_timer = asyncio.get_running_loop().call_later(
                interval, self.observe_soon, key)

    async def _observe_once(self, key: InstanceKey, state: InstanceState,
                            tables: Tables) -> bool:
        ns, inst = key
        if self._strategy(key) == AGENT:  # the agents probed and released; read their reports
            view = agent_view(self.world.pods_of(key), tables.revision)
            changed = view.probes != state.seen.probes or view.deferred != state.seen.deferred
            state.seen.probes, state.seen.deferred = dict(view.probes), view.deferred
            state.seen.released = view.released
            state.changed_keys.clear()
            return changed
        ready = [p for p in self.world.pods_of(key) if p.ready]
        if not ready or state.config is None:
            return False
        pods = [self._target(p).pod for p in ready]
        release = set(state.changed_keys)
        deferred, released = await observe_queues(self.runner, pods, state.config,
                                                  tables.tls_entries, release,
                                                  timeout=self.config.exec_timeout)
        state.changed_keys -= release
        state.seen.released += released
        policies = [p for p in self.world.policies_for(key)
                    if p.mode == "audit" or self.config.probe_enforced]
        probes = await probe_policies(self.runner, pods[0], policies, state.seen.probes,
                                      self.clock(), self.config.observe_interval,
                                      concurrency=self.config.probe_concurrency,
                                      timeouts=self.config.probe_timeouts)
        for ref in list(state.seen.probes):
            if not any(p.ref == ref for p in policies):
                del state.seen.probes[ref]
        changed = bool(probes) or deferred != state.seen.deferred
        state.seen.probes.update(probes)
        state.seen.deferred = deferred
        for ref, lines in tables.contributors.items():
            keys = [ln.split(" ", 1)[0] for ln in lines]
            self.metrics.deferred.labels(ns, ref.split("/", 1)[1], inst).set(
                sum(deferred[k].recipients for k in keys if k in deferred))
        return changed

    # ------------------------------------------------------------------ status

    def _recorded(self, ref: str, instance: str) -> tuple[list[str], str] | None:
        """(entries, revision for ``instance``) as the policy's stored status says."""
        ns, _, name = ref.partition("/")
        rec = self.world.policies.get(ns, {}).get(name)
        if rec is None:
            return None
        for item in rec.status.get("instances") or []:
            if isinstance(item, dict) and item.get("name") == instance:
                return list(rec.status.get("entries") or []), str(item.get("revision") or "")
        return None

    def views_for(self, rec: PolicyRecord) -> list[InstanceView]:
        views = []
        for key in self.world.instances_targeted_by(rec):
            state = self.states.get(key)
            if state is None or state.tables is None:
                views.append(InstanceView(key[1], "", len(self.world.pods_of(key)), 0))
                continue
            t = state.tables
            revision = state.since.get(rec.ref, ((), t.revision))[1]
            pods = self.world.pods_of(key)
            annotation = ANN_TEMPLATE_REVISION if pods and pods[0].annotation(
                ANN_STRATEGY, self.config.default_strategy) == "restart" else ANN_APPLIED
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
        """Offer the status of every policy of the namespace whose status changed to the
        status writer (coalesced, rate-limited, retried: see statuswriter.py).  Never
        blocks on the API: enforcement goes on while statuses drain.  A ``Pending``
        status waits ``pending_grace`` seconds, so a rollout that finishes first costs
        its policies one write, not two."""
        now = self.clock()
        counts: dict[str, int] = {}
        for rec in self.world.records(namespace):
            extra_conditions, extra_fields = self._observed(rec)
            status = policy_status(rec, self.views_for(rec), now, extra_conditions,
                                   extra_fields)
            ready = status["conditions"][0]["reason"]
            counts[ready] = counts.get(ready, 0) + 1
            if status != {k: rec.status.get(k) for k in status}:
                self.status_writer.offer(
                    rec.ref, rec, status,
                    delay=self.config.pending_grace if ready == PENDING else 0.0)
            else:
                self.status_writer.forget(rec.ref)  # already stored: nothing to write
        for reason, n in counts.items():
            self.metrics.policies.labels(namespace, reason).set(n)
        self.metrics.exceptions_active.labels(namespace).set(sum(
            1 for rec in self.world.records(namespace) if rec.policy is not None
            and rec.policy.exception is not None and not rec.policy.is_expired(now)))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background, kept alive until it ends, cancelled at stop."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _observed(self, rec: PolicyRecord) -> tuple[list[Condition], dict[str, Any]]:
        """Verified, status.probes and status.deferred of a policy, over its instances."""
        probes = []
        deferred: dict[str, Any] = {}
        keys = rec.policy.keys if rec.policy is not None else ()
        for key in self.world.instances_targeted_by(rec):
            state = self.states.get(key)
            if state is None:
                continue
            if rec.ref in state.seen.probes:
                probes.append((key[1], state.seen.probes[rec.ref]))
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
        """One status patch (the status writer calls it; a failure raises to it), then an
        Event when a condition changed to something a person should act on."""
        changed = transitions(rec.status.get("conditions") or [], status["conditions"])
        async with self._io:
            try:
                await self.kube.patch_policy_status(rec.namespace, rec.name, status)
            except NotFound:
                return  # deleted meanwhile
        rec.status = {**rec.status, **status}
        warnings = [c for c in changed if event_type(c) == "Warning"]
        if warnings:  # one Event per change, led by its weightiest condition
            await self._event(rec, "Warning", warnings[0]["reason"], "; ".join(
                f"{c['type']}={c['status']} {c['reason']}: {c['message']}" for c in warnings))

    async def _event(self, rec: PolicyRecord, kind: str, reason: str, message: str) -> None:
        try:
            await self.kube.post_event(
                {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "namespace": rec.namespace,
                 "name": rec.name, "uid": rec.uid}, kind, reason, message)
        except Exception as exc:  # events are best effort; never block status
            log.debug("event for %s not posted: %s", rec.ref, exc)


# ---------------------------------------------------------------------- Kopf glue


def register(registry: kopf.OperatorRegistry) -> None:
    """Register the handlers on ``registry``; each is one call into :class:`Operator`."""

    @kopf.on.startup(registry=registry)
    def _configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        """Server-side label selectors: on a shared cluster the API server sends only
        Postfix pods and our own ConfigMaps, not every pod and ConfigMap of the
        namespaces (the handlers' ``labels=`` filters are client-side, after the
        transfer and parsing).  Kopf applies these to every watch and list.

        No diff base: we register only event handlers, so Kopf's "last handled
        essence" is never used, yet building it deep-copies every body of every event
        (10,000 policies and their status echoes in a bulk load)."""
        settings.watching.label_selectors["v1", "pods"] = INSTANCE_LABEL
        settings.watching.label_selectors["v1", "configmaps"] = f"{MANAGED_BY}={OPERATOR}"
        settings.persistence.diffbase_storage = _NoDiffBase()
        # Thousands of long-lived policy records make every full collection walk them
        # all; young collections stay frequent enough for the event churn.
        gc.set_threshold(20_000, 20, 100)

    @kopf.on.startup(registry=registry, backoff=2.0)  # e.g. the API server answered 503
    async def _startup(memo: kopf.Memo, **_: Any) -> None:
        await memo.operator.start()

    @kopf.on.cleanup(registry=registry)
    async def _cleanup(memo: kopf.Memo, **_: Any) -> None:
        await memo.operator.stop()

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def _policy(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        memo.operator.on_policy(type, _plain(body))

    @kopf.on.event("v1", "pods", labels={INSTANCE_LABEL: kopf.PRESENT}, registry=registry)
    async def _pod(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        memo.operator.on_pod(type, _plain(body))

    @kopf.on.event("v1", "configmaps", labels={MANAGED_BY: OPERATOR}, registry=registry)
    async def _configmap(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        memo.operator.on_configmap(type, _plain(body))


class _NoDiffBase(kopf.DiffBaseStorage):
    """A diff base that is never built nor stored (no on.create/update/resume handlers)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def _one_line(exc: BaseException) -> str:
    """An API error as one log line: its status and the server's message when it has one."""
    status, body = getattr(exc, "status", None), getattr(exc, "body", None)
    if status is not None:
        try:
            import json

            message = json.loads(body or "{}").get("message") or ""
        except (ValueError, AttributeError):
            message = ""
        return f"HTTP {status}: {message or getattr(exc, 'reason', '')}"
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _plain(value: Any) -> Any:
    """Kopf's body views -> plain dicts and lists (the world keeps no Kopf objects)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def build_registry() -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    register(registry)
    return registry


__all__ = ["ANN_REVISION", "Config", "Operator", "build_registry", "register"]
