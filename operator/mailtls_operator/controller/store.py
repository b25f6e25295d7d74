"""The ConfigMap store: each instance's tables as its ConfigMap(s), kept as wanted.

Past ~1 MiB compressed a table is split into parts; parts are written first and
the primary (the manifest a pod follows) last, and parts no longer needed are
removed after it.  A ConfigMap edited or deleted by hand is noticed from its
watch event and restored by the next convergence.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..configmap import (
    LABEL_INSTANCE,
    TableTooLarge,
    configmap_bodies,
    configmap_name,
    is_own_name,
    merge_patch,
    part_number,
    same_content,
    stale_parts,
)
from ..kube import Conflict, Kube, NotFound
from ..render import Tables
from ..world import InstanceKey, World

log = logging.getLogger("mailtls.controller")


@dataclass(frozen=True)
class StoreResult:
    """What writing an instance's tables did: ``failure`` when they cannot be stored."""

    wrote: bool = False
    parts: int = 0
    failure: str | None = None


class ConfigMapStore:
    """Reads and writes the operator's ConfigMaps; the world keeps the last seen bodies."""

    def __init__(self, kube: Kube, world: World, *,
                 extra_data: Callable[[InstanceKey], dict[str, str]] | None = None) -> None:
        self.kube = kube
        self.world = world
        self.extra_data = extra_data or (lambda key: {})
        """More keys of the primary ConfigMap's data for an instance (agent mode's
        ``agent.json``): part of what is wanted, written and restored like the tables."""

    def _bodies(self, key: InstanceKey, tables: Tables) -> list[dict[str, Any]]:
        bodies = configmap_bodies(key[0], key[1], tables)
        extra = self.extra_data(key)
        if extra:
            bodies[0].setdefault("data", {}).update(extra)
        return bodies

    def record(self, body: Mapping[str, Any]) -> InstanceKey | None:
        """Remember one of our ConfigMaps; returns its instance (None: not ours)."""
        meta = body.get("metadata") or {}
        inst = (meta.get("labels") or {}).get(LABEL_INSTANCE)
        ns, name = meta.get("namespace", ""), meta.get("name", "")
        if not inst or not is_own_name(name, inst):
            return None
        self.world.configmaps[(ns, name)] = dict(body)
        return (ns, inst)

    def observe(self, event_type: str | None, body: Mapping[str, Any],
                tables_of: Callable[[InstanceKey], Tables | None]) -> InstanceKey | None:
        """A watch event on one of our ConfigMaps: the instance to converge again when it
        is not what we want (changed or deleted by hand, or an instance not yet known)."""
        meta = body.get("metadata") or {}
        ns, name = meta.get("namespace", ""), meta.get("name", "")
        if event_type == "DELETED":
            self.world.configmaps.pop((ns, name), None)
            inst = (meta.get("labels") or {}).get(LABEL_INSTANCE)
            key = (ns, inst) if inst else None
        else:
            key = self.record(body)
        if key is None:
            return None
        tables = tables_of(key)
        current = self.world.configmaps.get((ns, name))
        if tables is None or key not in self.world.instances():
            return key
        try:
            wanted = {b["metadata"]["name"]: b for b in self._bodies(key, tables)}
        except TableTooLarge:
            return None
        restore = (not same_content(current, wanted[name]) if name in wanted
                   else current is not None)  # a stale part: the worker deletes it
        if not restore:
            return None
        log.info("ConfigMap %s/%s was changed or deleted by hand; restoring", ns, name)
        return key

    def instances(self) -> set[InstanceKey]:
        """Instances that have a ConfigMap of ours."""
        out = set()
        for (ns, _), cm in self.world.configmaps.items():
            inst = ((cm.get("metadata") or {}).get("labels") or {}).get(LABEL_INSTANCE)
            if inst:
                out.add((ns, inst))
        return out

    def _own(self, ns: str, inst: str) -> list[str]:
        """Names of the instance's ConfigMaps we know of: the primary first, then parts."""
        parts = sorted((n for (s, n) in self.world.configmaps
                        if s == ns and part_number(n, inst)),
                       key=lambda n: part_number(n, inst) or 0)
        primary = configmap_name(inst)
        return ([primary] if (ns, primary) in self.world.configmaps else []) + parts

    async def retire(self, key: InstanceKey) -> None:
        """An instance with neither pods nor policies naming it: remove its ConfigMaps
        (the primary first, so no manifest is left pointing at missing parts)."""
        ns, inst = key
        for name in self._own(ns, inst):
            log.info("instance %s/%s has no pods and no policies: deleting ConfigMap %s",
                     ns, inst, name)
            await self.kube.delete_configmap(ns, name)
            self.world.configmaps.pop((ns, name), None)

    async def write(self, key: InstanceKey, tables: Tables) -> StoreResult:
        """Store the tables: parts first, the primary last, then stale parts removed."""
        ns, inst = key
        try:
            bodies = await asyncio.to_thread(self._bodies, key, tables)
        except TableTooLarge as exc:
            log.error("%s", exc)
            return StoreResult(failure=str(exc))
        wrote = 0
        for wanted in [*bodies[1:], bodies[0]]:
            wrote += await self._write_one(ns, wanted)
        for name in stale_parts([n for (s, n) in self.world.configmaps if s == ns], bodies):
            await self.kube.delete_configmap(ns, name)
            self.world.configmaps.pop((ns, name), None)
        if wrote:
            log.info("ConfigMap %s/%s: revision %s (%d entries%s)", ns, configmap_name(inst),
                     tables.short_revision, len(tables.tls_entries) - 1,
                     f", {len(bodies) - 1} parts" if len(bodies) > 1 else "")
        return StoreResult(wrote=bool(wrote), parts=len(bodies) - 1)

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
