"""The agent's work in its pod: install a revision, then observe (lint, queue, probes).

:meth:`Converger.install` hands the revision to :func:`..rollout.apply_to_pod`
(stage, ``postmap`` into a temporary file, atomic rename, reload only where
DESIGN.md §7 says, verify with the revision sentinel) through the local
:class:`~.runner.ProcessRunner`: the same argv and the same checks as the
``exec`` strategy.  On any failure the last good table stays live and the
report says why.  Postfix is never restarted.

:meth:`Converger.observe` does what the operator did by exec after a rollout:
``postconf -x`` for the lint, the queue read with mail deferred under keys
whose line the last install changed released (``postqueue -i``), and the
probes of ``agent.json`` that are new, changed or older than the interval.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .. import mailqueue, postfix, probe, rollout
from ..facts import read_facts
from ..observer import PolicyProbes, read_deferred
from ..podrunner import PodRef, PodRunner
from ..render import REVISION_KEY
from ..routing import InstanceConfig
from .desired import Desired, ProbeSpec, changed_keys, entries
from .report import AgentReport

log = logging.getLogger("mailtls.agent")


@dataclass(frozen=True)
class PodSettings:
    """Where the pod's tables live and how Postfix reads them (the pod's annotations)."""

    namespace: str
    pod: str
    map_path: str = rollout.DEFAULT_MAP_PATH
    map_type: str = rollout.DEFAULT_MAP_TYPE
    transport_path: str | None = None
    reload: bool = False
    timeout: float = 60.0
    probe_interval: float = 3600.0
    """Seconds after which an unchanged policy is probed again (0: only after changes)."""

    def target(self) -> rollout.PodTarget:
        return rollout.PodTarget(PodRef(self.namespace, self.pod, "agent"), self.map_path,
                                 self.map_type, transport_path=self.transport_path,
                                 reload=self.reload)


@dataclass
class Converger:
    """The pod's state as the agent knows it; ``report`` is what it last told the operator."""

    runner: PodRunner
    settings: PodSettings
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    live: Desired | None = None
    wanted: Desired | None = None
    release_keys: set[str] = field(default_factory=set)
    report: AgentReport = field(default_factory=AgentReport)

    @property
    def pod(self) -> PodRef:
        return self.settings.target().pod

    async def live_revision_value(self) -> str | None:
        """What the live table answers for the revision key (None: no table or no answer)."""
        t = self.settings
        try:
            res = await self.runner.run(self.pod, postfix.postmap_query(
                REVISION_KEY, t.map_type, t.map_path), timeout=t.timeout)
        except Exception:
            return None
        return res.stdout.decode("utf-8", "replace").strip() if res.ok else None

    def _live_entries(self) -> dict[str, str]:
        """The table being replaced, read from the live text file (after a restart too)."""
        if self.live is not None:
            return dict(self.live.tls_entries)
        try:
            return entries(Path(self.settings.map_path).read_text("utf-8"))
        except OSError:
            return {}

    async def install(self, desired: Desired, source: str) -> bool:
        """Make ``desired`` live unless it already is; True when it is live now."""
        self.wanted = desired
        self.report.wanted, self.report.source = desired.revision, source
        if self.live is not None and self.live.revision == desired.revision:
            self.live = desired  # same tables; agent.json (probes) may have changed
            return True
        if self.live is None and \
                await self.live_revision_value() == desired.tls_entries[REVISION_KEY]:
            self.live = desired  # loaded at start (init container) or before a restart
            self.report.applied, self.report.error = desired.revision, ""
            return True
        old = self._live_entries()
        tables = rollout.TableSet(desired.revision, desired.tls_policy, desired.transport,
                                  desired.tls_entries, desired.transport_entries)
        outcome = await rollout.apply_to_pod(self.runner, self.settings.target(), tables,
                                             timeout=self.settings.timeout)
        if not outcome.ok:
            self.report.error = outcome.describe()
            log.error("revision %s not installed, the last good table stays live: %s",
                      desired.revision[:16], self.report.error)
            return False
        self.release_keys |= changed_keys(old, desired.tls_entries)
        self.live = desired
        self.report.applied, self.report.error = desired.revision, ""
        log.info("revision %s live and verified (%.3f s)", desired.revision[:16],
                 outcome.duration)
        return True

    def refuse(self, why: str, source: str) -> None:
        """A ConfigMap that cannot be loaded: keep the live table, say why."""
        self.report.error, self.report.source = why, source
        log.error("ConfigMap refused, the last good table stays live: %s", why)

    async def drifted(self) -> bool:
        """Does the live table no longer answer the revision the agent installed (edited or
        restored by hand)?  Then it is forgotten, and the next install rolls it again."""
        if self.live is None:
            return False
        if await self.live_revision_value() == self.live.tls_entries[REVISION_KEY]:
            return False
        log.warning("the live table no longer answers revision %s: installing it again",
                    self.live.revision[:16])
        self.live = None
        self.report.applied = ""
        return True

    async def observe(self) -> None:
        """Lint facts, queue (releasing mail under changed keys), due probes."""
        if self.live is None:
            return
        timeout = self.settings.timeout
        try:  # one postconf -x: routing for the lint and the queue, client defaults
            facts = await read_facts(self.runner, self.pod, timeout=timeout)
        except Exception as exc:
            log.warning("postconf: %s", exc)
            return
        self.report.facts = facts
        self.report.tafile_missing = [p for p in self.live.tafiles
                                      if not os.access(p, os.R_OK)]
        await self._queue(facts.routing, timeout)
        await self._probe(self.live.probes, facts.client)

    async def _queue(self, config: InstanceConfig, timeout: float) -> None:
        try:
            deferred = await read_deferred(self.runner, self.pod, config,
                                           list(self.live.tls_entries) if self.live else [],
                                           timeout=timeout)
        except Exception as exc:
            log.warning("cannot read the queue: %s", exc)
            return
        release, self.release_keys = self.release_keys, set()
        ids = mailqueue.releasable_ids(deferred, release)
        if ids:
            outcomes = await mailqueue.release(self.runner, self.pod, ids, timeout=timeout)
            self.report.released += sum(1 for o in outcomes if o.ok)
            log.info("released %d message(s) deferred under changed keys %s", len(ids),
                     ", ".join(sorted(release & set(deferred))))
            deferred = {k: v for k, v in deferred.items() if k not in release}
        self.report.deferred = deferred

    async def _probe(self, specs: tuple[ProbeSpec, ...], defaults: probe.ClientDefaults
                     ) -> None:
        now, interval = self.clock(), self.settings.probe_interval
        known = self.report.probes
        for ref in set(known) - {s.ref for s in specs}:
            del known[ref]
        due = [s for s in specs if (last := known.get(s.ref)) is None or last.value != s.value
               or (interval > 0 and (now - last.at).total_seconds() >= interval)]
        if not due:
            return

        async def one(spec: ProbeSpec) -> None:
            try:
                outcomes = await probe.probe_policy(self.runner, self.pod, spec, concurrency=2,
                                                    defaults=defaults)
            except Exception as exc:
                log.warning("probing %s failed: %s", spec.ref, exc)
                return
            known[spec.ref] = PolicyProbes(spec.value, now, outcomes)

        await asyncio.gather(*(one(s) for s in due))
