"""The Kopf handlers: the only place that imports kopf.  Each is one call into the
:class:`~.conductor.Operator` kept in the memo."""

from __future__ import annotations

import gc
from collections.abc import Mapping
from typing import Any

import kopf

from ..configmap import MANAGED_BY, OPERATOR
from ..crd import GROUP, PLURAL, VERSION
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
