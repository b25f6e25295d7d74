"""The Kopf handlers: the only place that imports kopf.  Each is one call into the
:class:`~.conductor.Operator` kept in the memo."""

from __future__ import annotations

import gc
from collections.abc import Mapping
from typing import Any

import kopf

from ..configmap import MANAGED_BY, OPERATOR
from ..crd import GROUP, PLURAL, VERSION
from ..kube import PAGE
from ..world import INSTANCE_LABEL
from .conductor import CrdMissing


def register(registry: kopf.OperatorRegistry) -> None:
    """Register the handlers on ``registry``."""

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
        gc.set_threshold(10_000, 10, 10)
        # Kopf's per-object worker (a task, its queue and frames, the event it holds) waits
        # this long for the object's next event before it ends.  Our handlers keep no
        # per-object state in Kopf, so lingering buys nothing; 5 s (Kopf's default) kept
        # 10,000 workers alive at once in a bulk load, and the memory they took came back
        # to the system only in part (measured: peak 269 -> 170 MiB, quiet 244 -> 168 MiB).
        settings.queueing.idle_timeout = WORKER_IDLE
        # Lists in pages, as our own start-up list does: a restart with 10,000 policies
        # never holds them all as one response.
        settings.watching.chunk_size = PAGE

    @kopf.on.startup(registry=registry, backoff=2.0)  # e.g. the API server answered 503
    async def _startup(memo: kopf.Memo, **_: Any) -> None:
        try:
            await memo.operator.start()
        except CrdMissing as exc:
            raise kopf.PermanentError(str(exc)) from exc

    @kopf.on.cleanup(registry=registry)
    async def _cleanup(memo: kopf.Memo, **_: Any) -> None:
        await memo.operator.stop()

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def _policy(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        meta = body.metadata
        if memo.operator.known(type, meta.namespace or "", meta.name or "",
                               str(meta.get("resourceVersion") or "")):
            return
        memo.operator.on_policy(type, _plain(body))

    @kopf.on.event(GROUP, VERSION, "mailtlsdiscoveries", registry=registry)
    async def _discovery(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        memo.operator.discovery.on_object(type, _plain(body))

    @kopf.on.event("v1", "pods", labels={INSTANCE_LABEL: kopf.PRESENT}, registry=registry)
    async def _pod(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        memo.operator.on_pod(type, _plain(body))

    @kopf.on.event("v1", "configmaps", labels={MANAGED_BY: OPERATOR}, registry=registry)
    async def _configmap(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        memo.operator.on_configmap(type, _plain(body))


WORKER_IDLE = 0.5
"""Seconds a per-object Kopf worker waits for the object's next event."""


def operator_options() -> dict[str, Any]:
    """Extra arguments for ``kopf.operator``, for every caller (``mailtls run``, the
    testbed, the benchmarks): per-event memories (see :class:`_EventMemories`)."""
    return {"memories": _EventMemories()} if _EventMemories is not None else {}


def _event_memories() -> type | None:
    """Kopf keeps a record for every object it has seen (a memo copy, throttler, daemon
    and index bookkeeping: about 1 KiB), for daemons, timers, indexes and resumable
    handlers.  We register only event handlers, which use none of it across events, so
    each event gets a fresh record that is not kept: 10,000 policies cost Kopf no
    memory between events.  The class is Kopf's internal one; where a Kopf release
    moves it, Kopf's default is used (and a unit test says so)."""
    try:
        from kopf._core.reactor.inventory import ResourceMemories, ResourceMemory
    except ImportError:  # pragma: no cover - a Kopf that moved it
        return None

    class EventMemories(ResourceMemories):
        async def recall(self, raw_body: Any, *, memobase: Any = None,
                         noticed_by_listing: bool = False,
                         ephemeral: bool = False) -> ResourceMemory:
            return await super().recall(raw_body, memobase=memobase,
                                        noticed_by_listing=noticed_by_listing,
                                        ephemeral=True)

    return EventMemories


_EventMemories = _event_memories()


class _NoDiffBase(kopf.DiffBaseStorage):
    """A diff base that is never built nor stored (no on.create/update/resume handlers)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


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
