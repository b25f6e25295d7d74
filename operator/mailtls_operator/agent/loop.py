"""The agent's loop: the ConfigMap from the API (volume as fallback), converge, report.

Level-based like the operator: whatever event arrives, the agent reads the
whole wanted state (the primary ConfigMap and, for a split table, its parts)
and converges to it; applying a revision twice is a no-op.

- **Start**: the API is asked once; when it does not answer, the table comes
  from the ConfigMap mounted in the pod (the kubelet's copy), so a pod that
  starts during an API outage still serves the current table.
- **Watch**: one watch on the primary ConfigMap by name; a change is live in
  the pod within one ``postmap`` + rename, not the kubelet's 60-120 s sync.
- **Outage**: the loop retries with backoff (``--retry-max``); meanwhile the
  mounted volume is re-read and taken only when it moved since the API last
  answered (the kubelet synced something newer), never to roll back.
- **Failure**: a malformed set, a missing part (sha256), a ``postmap`` or
  verify failure: the last good table stays live and the report says why.
- **Report**: the pod's ``mailtls.io/*`` annotations, patched when their
  content changed (retried until the API takes them).
- **TLS outcomes** (Postfix 3.10's TLSRPT, :mod:`.tlsrpt`): after each observation
  the collector listens where the facts say Postfix sends (or where it was told)
  and attributes with the live table and routing; every ``outcomes_interval`` the
  counts go into the report, which is sent when they changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import postfix
from ..aio import wait_event
from ..configmap import ANN_PARTS, MAX_PARTS, configmap_name, part_name
from ..outcomes import Routes
from ..render import REVISION_KEY
from .api import AgentApi, ApiUnavailable, Expired, NotFound
from .converge import Converger
from .desired import Desired, Malformed, from_configmaps, from_directory
from .tlsrpt import AUTO, OFF, OutcomeCollector, site_routes, socket_path

log = logging.getLogger("mailtls.agent")


def _metadata(obj: Any) -> dict[str, Any]:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return meta if isinstance(meta, dict) else {}


def _resource_version(obj: Any, default: str) -> str:
    rv = _metadata(obj).get("resourceVersion")
    return rv if isinstance(rv, str) and rv else default


def _parts_named(primary: Any) -> int:
    """``mailtls.io/parts`` of the primary: 0..MAX_PARTS, else :class:`Malformed`."""
    annotations = _metadata(primary).get("annotations") or {}
    if not isinstance(annotations, dict):
        raise Malformed("metadata.annotations is not an object")
    raw = annotations.get(ANN_PARTS) or "0"
    if not isinstance(raw, str) or not raw.isascii() or not raw.isdigit() \
            or len(raw) > 3 or int(raw) > MAX_PARTS:
        raise Malformed(f"{ANN_PARTS}: not a part count of 0..{MAX_PARTS}")
    return int(raw)


@dataclass(frozen=True)
class LoopSettings:
    instance: str
    configmap_dir: Path
    parts_dir: Path | None = None
    observe_interval: float = 300.0
    retry_base: float = 0.5
    retry_max: float = 30.0
    watch_timeout: int = 300
    tlsrpt_socket: str = AUTO
    """Where to receive Postfix's TLSRPT datagrams: ``auto`` (where its main.cf says),
    ``off``, or a path."""
    outcomes_interval: float = 15.0
    """Seconds between two looks at the counts (a report is sent only when they changed)."""


class Agent:
    """One pod's agent: ``await agent.run()`` until cancelled."""

    def __init__(self, api: AgentApi, converger: Converger, settings: LoopSettings,
                 collector: OutcomeCollector | None = None) -> None:
        self.api = api
        self.converger = converger
        self.settings = settings
        self.collector = collector if settings.tlsrpt_socket != OFF else None
        self._routed: tuple[object, str] | None = None
        """(facts, revision) the collector was last pointed at."""
        self._site: dict[str, str] = {}
        """The site's own transport routes, as last read (``postmap -s``)."""
        self.namespace = converger.settings.namespace
        self._report_wake = asyncio.Event()
        self._observe_wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._volume_at_api: str | None = None
        self.api_ok = False
        self.last_sent: str | None = None

    @property
    def primary(self) -> str:
        return configmap_name(self.settings.instance)

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._reporter(), name="mailtls-agent:report"),
                 asyncio.create_task(self._observer(), name="mailtls-agent:observe")]
        if self.collector is not None:
            tasks.append(asyncio.create_task(self._outcomes(), name="mailtls-agent:outcomes"))
        try:
            await self._follow()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self.collector is not None:
                self.collector.stop()

    # -- the ConfigMap --------------------------------------------------------------

    async def _follow(self) -> None:
        failures = 0
        while True:
            try:
                try:
                    body: dict[str, Any] | None = await self.api.get_configmap(
                        self.namespace, self.primary)
                except NotFound:  # not written yet: the watch's ADDED event brings it
                    body = None
                self._api_back()
                failures = 0
                rv = ""
                if body is not None:
                    await self._take(body)
                    rv = _resource_version(body, "")
                while True:  # resume from the last position until it expires
                    opened, events = time.monotonic(), 0
                    async for kind, obj in self.api.watch_configmap(
                            self.namespace, self.primary, rv,
                            timeout_seconds=self.settings.watch_timeout):
                        events += 1
                        rv = _resource_version(obj, rv)
                        if kind in ("ADDED", "MODIFIED"):
                            await self._take(obj)
                    if not events and time.monotonic() - opened < 1.0:
                        await asyncio.sleep(self.settings.retry_base)  # no hot loop
            except Expired:
                continue
            except ApiUnavailable as exc:
                failures += 1
                self._api_lost(str(exc))
                await self._from_volume()
                await asyncio.sleep(self._delay(failures))

    def _api_back(self) -> None:
        if not self.api_ok:
            log.info("API server reachable")
        self.api_ok = True
        self.converger.report.api_error = ""
        self._volume_at_api = self._volume_revision()

    def _api_lost(self, why: str) -> None:
        if self.api_ok or not self.converger.report.api_error:
            log.warning("API server unreachable, the mounted ConfigMap is the fallback: %s",
                        why)
        self.api_ok = False
        self.converger.report.api_error = why
        self._report_wake.set()

    async def _take(self, primary: dict[str, Any]) -> None:
        """Load the set the primary names, or refuse it (reported; the last good table
        stays live).  Whatever the object holds, nothing but a refusal comes of it: the
        agent must not crash-loop on one bad ConfigMap."""
        bodies: list[Any] = [primary]
        try:
            for number in range(1, _parts_named(primary) + 1):
                bodies.append(await self.api.get_configmap(
                    self.namespace, part_name(self.settings.instance, number)))
            desired = from_configmaps(bodies)
        except NotFound as exc:  # a part not written (yet): the set is incomplete
            await self._refuse(f"a part ConfigMap is missing: {exc}", "api")
            return
        except (Malformed, ValueError) as exc:
            await self._refuse(str(exc), "api")
            return
        await self._install(desired, "api")

    def _volume_revision(self) -> str | None:
        try:
            return self._volume().revision
        except (Malformed, OSError, ValueError):
            return None

    def _volume(self) -> Desired:
        return from_directory(self.settings.configmap_dir, self.settings.parts_dir)

    async def _from_volume(self) -> None:
        """The mounted ConfigMap during an outage: at start, or when it moved since the API
        last answered (never back to what the API already replaced)."""
        try:
            desired = self._volume()
        except (Malformed, OSError, ValueError) as exc:
            if self.converger.live is None:
                await self._refuse(f"no table: API down and the mounted ConfigMap: {exc}",
                                   "volume")
            return
        if self.converger.live is not None and desired.revision == self._volume_at_api:
            return
        if self.converger.live is not None and desired.revision == self.converger.live.revision:
            return
        await self._install(desired, "volume")

    async def _refuse(self, why: str, source: str) -> None:
        async with self._lock:
            self.converger.refuse(why, source)
        self._report_wake.set()

    async def _install(self, desired: Desired, source: str) -> None:
        async with self._lock:
            before = self.converger.live.revision if self.converger.live else None
            await self.converger.install(desired, source)
            after = self.converger.live.revision if self.converger.live else None
            if after != before:
                self._route_live()
        self._report_wake.set()
        if after != before or self.converger.report.facts is None:
            self._observe_wake.set()

    # -- observing and reporting ------------------------------------------------------

    def _behind(self) -> bool:
        wanted, live = self.converger.wanted, self.converger.live
        return wanted is not None and (live is None or live.revision != wanted.revision)

    async def _observer(self) -> None:
        """Observe after each change and every ``observe_interval``; while the wanted revision
        failed to install, try it again with backoff (level-based: no new event needed)."""
        failures = 0
        while True:
            wait = self.settings.observe_interval or None
            if self._behind():
                failures += 1
                backoff = self._delay(failures)
                wait = backoff if wait is None else min(wait, backoff)
            else:
                failures = 0
            await wait_event(self._observe_wake, wait)
            self._observe_wake.clear()
            async with self._lock:
                wanted = self.converger.wanted
                if wanted is not None and (self._behind() or await self.converger.drifted()):
                    await self.converger.install(wanted, self.converger.report.source)
                    self._route_live()
                await self.converger.observe()
            self._report_wake.set()

    async def _collect_where_postfix_sends(self) -> None:
        """Point the TLSRPT collector at the socket and the routing of the live revision,
        after each observation (the site's transport tables may have changed) and each
        new revision."""
        collector, facts, live = self.collector, self.converger.report.facts, \
            self.converger.live
        if collector is None or facts is None or live is None or (
                self._routed is not None and self._routed[0] is facts
                and self._routed[1] == live.revision):
            return  # the same observation (each one reads the facts anew) and revision
        self._routed = (facts, live.revision)
        if self.settings.tlsrpt_socket == AUTO:
            collector.listen(*socket_path(facts.values))
        else:
            collector.listen(self.settings.tlsrpt_socket)
        target = self.converger.settings.target()
        try:
            site = await site_routes(
                self.converger.runner, self.converger.pod, facts.routing,
                postfix.map_spec(target.map_type, target.transport_map_path),
                timeout=self.converger.settings.timeout)
        except Exception as exc:  # attribution falls back to the bare next-hop
            log.warning("cannot read the site's transport routes: %s", exc)
            site = {}
        self._site = dict(site)
        self._route_live()

    def _route_live(self) -> None:
        """Attribute with the live revision's table from now on, the site's routes as last
        read.  Called also the moment a new revision is live, before the report that says
        so, not at the next outcomes tick (up to ``outcomes_interval`` later): a session
        to a key the revision added would meanwhile count under no key."""
        collector, facts, live = self.collector, self.converger.report.facts, \
            self.converger.live
        if collector is None or facts is None or live is None:
            return
        table = frozenset(k for k in live.tls_entries if k != REVISION_KEY)
        collector.route(Routes(
            table_keys=table,
            audit_keys=frozenset(k for p in live.probes for k in p.keys if k not in table),
            config=facts.routing, transport={**self._site, **live.transport_entries}))

    async def _outcomes(self) -> None:
        """Every ``outcomes_interval``: follow the facts and the live revision (the
        observer reads them), then the counts into the report (sent if they changed): no
        lock, so probes in flight never hold the collector back."""
        assert self.collector is not None
        while True:
            await self._collect_where_postfix_sends()
            self.converger.report.outcomes = self.collector.report()
            self._report_wake.set()
            await asyncio.sleep(self.settings.outcomes_interval)

    def _delay(self, failures: int) -> float:
        return min(self.settings.retry_max,
                   self.settings.retry_base * 2.0 ** min(failures - 1, 16))

    async def _reporter(self) -> None:
        failures = 0
        while True:
            await self._report_wake.wait()
            self._report_wake.clear()
            report = self.converger.report
            text = report.content()
            if text == self.last_sent:
                continue
            report.touch()
            try:
                await self.api.patch_pod_annotations(self.namespace,
                                                     self.converger.settings.pod,
                                                     report.annotations())
            except ApiUnavailable as exc:
                failures += 1
                log.warning("report not written (retrying): %s", exc)
                await asyncio.sleep(self._delay(failures))
                self._report_wake.set()
                continue
            failures = 0
            self.last_sent = text
