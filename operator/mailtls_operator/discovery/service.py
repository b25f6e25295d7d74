"""Discovery in the operator: one refresh loop per MailTLSDiscovery, entries for the workers.

Thin I/O around the pure core.  Each object gets a loop that runs a discovery
round (:class:`Discoverer`, whose MTA-STS cache outlives rounds), wakes the
workers of its namespace -- they render the discovered entries with every
static policy through the one precedence rule -- and writes its status.  A
change of a domain's id, mode or MX list is an Event and a metric.  The
loop sleeps until the next check (``checkIntervalSeconds``), or less when a
cached policy is due for its refresh ahead of expiry, or one minute after a
failed lookup.  No kopf here: the operator's handler feeds :meth:`on_object`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..policy import Policy
from ..render import Loss, Tables
from .decide import DomainState
from .dns import Dns
from .engine import Discoverer
from .entries import DomainInvalid, domain_keys
from .fetch import ssl_context
from .objects import KIND, Discovery, DiscoveryInvalid, load_discovery
from .report import cached_from_status, changes, domain_status

log = logging.getLogger(__name__)

ObjKey = tuple[str, str]
RETRY_AFTER_FAILURE = 60.0
MIN_DELAY = 5.0


class DiscoveryService:
    """MailTLSDiscovery objects, their discovered state, and the loops that refresh it."""

    def __init__(self, *, wake: Callable[[str], None],
                 write_status: Callable[[str, str, dict[str, Any]], Awaitable[Any]],
                 post_event: Callable[[dict[str, Any], str, str, str], Awaitable[None]],
                 clock: Callable[[], datetime], registry: CollectorRegistry | None = None,
                 discoverer: Discoverer | None = None) -> None:
        self.wake = wake
        self.write_status = write_status
        self.post_event = post_event
        self.clock = clock
        self.discoverer = discoverer or Discoverer(Dns(), ssl_context(None))
        self.objects: dict[ObjKey, Discovery] = {}
        self.meta: dict[ObjKey, dict[str, Any]] = {}
        self.states: dict[ObjKey, list[DomainState]] = {}
        self.reported: dict[ObjKey, dict[str, dict[str, Any]]] = {}
        self.losses: dict[str, list[Loss]] = {}
        self.held: dict[str, list[tuple[str, str]]] = {}
        self.probes: dict[str, dict[str, Any]] = {}
        """entry ref -> key -> the last probe of a testing-mode line ("would pass/fail")."""
        self.tasks: dict[ObjKey, asyncio.Task[None]] = {}
        self._background: set[asyncio.Future[None]] = set()
        self._gauged: dict[ObjKey, set[tuple[str, str]]] = {}
        self._caching: set[ObjKey] = set()
        self.changes = Counter("mailtls_discovered_policy_changes_total",
                               "Discovered domains whose policy id, mode or MX list changed",
                               ["namespace", "discovery", "field"], registry=registry)
        self.domains = Gauge("mailtls_discovered_domains", "Discovered domains by source/mode",
                             ["namespace", "discovery", "source", "mode"], registry=registry)
        self.failing = Gauge("mailtls_discovery_failing_domains",
                             "Domains of a MailTLSDiscovery whose last lookup or refresh failed",
                             ["namespace", "discovery"], registry=registry)
        self.cache_expiry = Gauge(
            "mailtls_discovery_cache_expiry_timestamp_seconds",
            "Earliest expiry of a MailTLSDiscovery's cached MTA-STS policies, Unix time (a "
            "series only while a policy is cached)", ["namespace", "discovery"],
            registry=registry)

    # ------------------------------------------------------------------ events

    def on_object(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace") or "default", meta.get("name") or "")
        if event_type == "DELETED":
            self._cancel(key)
            self._forget_gauges(key)
            self.objects.pop(key, None)
            self.meta.pop(key, None)
            self.states.pop(key, None)
            self.reported.pop(key, None)
            self.wake(key[0])
            return
        self.meta[key] = {"uid": meta.get("uid", ""), "generation": meta.get("generation"),
                          "apiVersion": body.get("apiVersion", "mailtls.io/v1alpha1")}
        if key not in self.reported:  # after a restart: changes are relative to the status
            status = body.get("status") or {}
            self.reported[key] = {d.get("domain", ""): d for d in status.get("domains") or []
                                  if isinstance(d, dict)}
            self._seed_cache(self.reported[key])
        try:
            obj = load_discovery(body)
        except DiscoveryInvalid as exc:
            self._spawn(self._write(key, invalid=str(exc)))
            return
        task = self.tasks.get(key)
        if self.objects.get(key) == obj and task is not None and not task.done():
            return  # our own status write, or a label change: nothing to redo
        self.objects[key] = obj
        self._cancel(key)
        self.tasks[key] = asyncio.get_running_loop().create_task(
            self._loop(key), name=f"mailtls:discovery:{key[0]}/{key[1]}")

    def _seed_cache(self, recorded: Mapping[str, Mapping[str, Any]]) -> None:
        """MTA-STS policies recorded by a previous operator (restart, leader change) become
        the cache again, so a failing refresh keeps them until they expire."""
        for domain, item in recorded.items():
            cached = cached_from_status(item)  # None where DANE won (mode dane-only)
            try:
                name = domain_keys(domain)[0]
            except DomainInvalid:
                continue
            if cached is not None and name not in self.discoverer.cache:
                self.discoverer.cache[name] = cached

    def entries_for(self, instance: tuple[str, str]) -> list[Policy]:
        """Discovered entries that target ``instance``: the workers render them."""
        out: list[Policy] = []
        for key, obj in self.objects.items():
            if obj.namespace == instance[0] and (not obj.instances
                                                 or instance[1] in obj.instances):
                out.extend(obj.entries(self.states.get(key, [])))
        return out

    def rendered(self, namespace: str, tables: Tables,
                 warnings: Mapping[str, list[tuple[str, str]]]) -> None:
        """After a render: who beat each discovered entry, what was held back; status if new."""
        touched: set[ObjKey] = set()
        for key in [k for k in self.objects if k[0] == namespace]:
            prefix = f"{key[0]}/{key[1]}["
            for ref in {r for r in (*tables.losses, *warnings, *self.losses, *self.held)
                        if r.startswith(prefix)}:
                losses, held = tables.losses.get(ref, []), list(warnings.get(ref, []))
                if self.losses.get(ref, []) != losses or self.held.get(ref, []) != held:
                    self.losses[ref], self.held[ref] = losses, held
                    touched.add(key)
        for key in touched:
            self._spawn(self._write(key))

    def probed(self, namespace: str, probes: Mapping[str, Any]) -> None:
        """Probe results of an instance (ref -> PolicyProbes): testing-mode entries say
        whether they would pass if enforced; status rewritten when that changes."""
        for key in [k for k in self.objects if k[0] == namespace]:
            prefix = f"{key[0]}/{key[1]}["
            for ref, found in probes.items():
                if not ref.startswith(prefix):
                    continue
                by_key = {o.destination: o.to_status() for o in getattr(found, "outcomes", ())}
                if self.probes.get(ref) != by_key:
                    self.probes[ref] = by_key
                    self._spawn(self._write(key))

    # ------------------------------------------------------------------- loops

    async def _loop(self, key: ObjKey) -> None:
        while True:
            obj = self.objects[key]
            now = self.clock()
            try:
                states = await self.discoverer.discover_all(obj.domains, now, obj.sources)
            except Exception:  # a bug must not end the loop for good
                log.exception("discovery round for %s/%s failed", *key)
                await asyncio.sleep(RETRY_AFTER_FAILURE)
                continue
            self.states[key] = states
            self.wake(key[0])
            await self._write(key)
            await asyncio.sleep(self._delay(obj, states, now))

    def _delay(self, obj: Discovery, states: list[DomainState], now: datetime) -> float:
        delay = float(obj.check_interval)
        if not all(s.decided for s in states):
            delay = min(delay, RETRY_AFTER_FAILURE)
        for s in states:
            if s.sts is not None and s.sts.cached is not None:
                due = (s.sts.cached.refresh_at() - now) / timedelta(seconds=1)
                delay = min(delay, max(due, MIN_DELAY))
        return delay

    async def _write(self, key: ObjKey, invalid: str = "") -> None:
        meta = self.meta.get(key, {})
        status: dict[str, Any] = {"observedGeneration": meta.get("generation")}
        if invalid:
            status["conditions"] = [_condition("False", "Invalid", invalid)]
        else:
            domains = [self._domain(key, s) for s in self.states.get(key, [])]
            status.update(self._summary(key, domains))
            await self._signal(key, domains)
        try:
            await self.write_status(key[0], key[1], status)
        except Exception as exc:  # the object may be gone; the next round writes again
            log.warning("status of %s %s/%s not written: %s", KIND, *key, exc)

    def _domain(self, key: ObjKey, state: DomainState) -> dict[str, Any]:
        prefix = f"{key[0]}/{key[1]}["
        losses = [lo for ref, ls in self.losses.items() if ref.startswith(prefix) for lo in ls
                  if lo.key == state.domain.lower()]
        out = domain_status(state, losses)
        for ref, by_key in self.probes.items():
            found = by_key.get(state.domain.lower())
            if ref.startswith(prefix) and found and out.get("wouldEnforce"):
                out["probe"] = found  # testing: would this pass if enforced?
        # the instance lint of the line's source (UnsupportedAttribute: held back;
        # DNSSECDisabled: dane ignored there); every entry of one source has the same
        # attributes, so the same verdict
        warned = self.held.get(f"{prefix}{out['source']}]", [])
        if warned and out.get("entry"):
            out["warnings"] = [{"reason": r, "message": m} for r, m in warned]
        return out

    def _summary(self, key: ObjKey, domains: list[dict[str, Any]]) -> dict[str, Any]:
        failed = [d for d in domains if d["lastError"]]
        enforced = sum(1 for d in domains if d.get("entry"))
        testing = sum(1 for d in domains if d.get("wouldEnforce"))
        counts: dict[tuple[str, str], int] = {}
        for d in domains:
            label = (d["source"] or "none", d["mode"] or "none")
            counts[label] = counts.get(label, 0) + 1
        self._gauge(key, counts, len(failed), [
            datetime.fromisoformat(d["expiresAt"]).timestamp() for d in domains
            if d.get("expiresAt")])
        if not self.states.get(key):
            cond = _condition("Unknown", "Discovering", "first discovery round running")
        elif failed:
            cond = _condition("False", "LookupFailed", "; ".join(
                f"{d['domain']}: {d['lastError']}" for d in failed[:5]))
        else:
            cond = _condition("True", "Discovered",
                              f"{enforced} enforced, {testing} testing, "
                              f"{len(domains) - enforced - testing} without a line")
        return {"conditions": [cond], "enforced": enforced, "testing": testing,
                "domains": domains}

    def _gauge(self, key: ObjKey, counts: Mapping[tuple[str, str], int], failing: int,
               expiries: list[float]) -> None:
        """The object's series: domains by source and mode, failing domains, the earliest
        cache expiry. Per object, never per domain; all removed with the object."""
        for label in self._gauged.get(key, set()) - set(counts):
            self.domains.remove(key[0], key[1], *label)
        for label, n in counts.items():
            self.domains.labels(key[0], key[1], *label).set(n)
        self._gauged[key] = set(counts)
        self.failing.labels(*key).set(failing)
        if expiries:
            self.cache_expiry.labels(*key).set(min(expiries))
            self._caching.add(key)
        elif key in self._caching:
            self.cache_expiry.remove(*key)
            self._caching.discard(key)

    def _forget_gauges(self, key: ObjKey) -> None:
        self._gauge(key, {}, 0, [])
        if key in self._gauged:  # the object had a summary, so it has a failing series
            self.failing.remove(*key)
            del self._gauged[key]

    async def _signal(self, key: ObjKey, domains: list[dict[str, Any]]) -> None:
        """An Event and a metric per domain whose id, mode or MX list changed."""
        before = self.reported.setdefault(key, {})
        meta = self.meta.get(key, {})
        for d in domains:
            old = before.get(d["domain"])
            diff = changes(old, d)
            before[d["domain"]] = d
            if not diff:
                continue
            # a person may have to act when a line is lost (enforce -> testing/none, a
            # policy gone); a new id, MX list or stricter mode is news, not an alarm
            lost = bool(old and old.get("entry") and not d.get("entry"))
            for item in diff:
                self.changes.labels(key[0], key[1], item.split(" ", 1)[0]).inc()
            involved = {"kind": KIND, "namespace": key[0], "name": key[1],
                        "uid": meta.get("uid", ""), "apiVersion": meta.get("apiVersion")}
            with contextlib.suppress(Exception):
                await self.post_event(involved, "Warning" if lost else "Normal",
                                      "PolicyChanged", f"{d['domain']}: {'; '.join(diff)}"
                                      + ("; its line is no longer written" if lost else ""))

    # ------------------------------------------------------------------- tasks

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _cancel(self, key: ObjKey) -> None:
        task = self.tasks.pop(key, None)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        tasks = [*self.tasks.values(), *self._background]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks.clear()


def _condition(status: str, reason: str, message: str) -> dict[str, Any]:
    return {"type": "Ready", "status": status, "reason": reason, "message": message[:1024],
            "lastTransitionTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
