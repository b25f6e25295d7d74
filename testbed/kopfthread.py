"""A Kopf operator in a thread of its own, against the test bed's real kube-apiserver.

The tests that need to look inside the operator (its pod runner, its idle signal, its
metrics) run it in-process: Kopf in a thread with its own event loop, logged in as the
control plane's admin (client certificate), the operator's own API calls through the
official client with the same credentials.  The caller's event loop stays free for
what else the test runs (agents, sinks); nothing here shares a loop with it.

The block starts once Kopf watches every resource it has handlers for in the given
namespaces, as kube-apiserver's audit log shows (a watch is logged when its response
starts; the admin's watches in those namespaces are Kopf's: the operator's own calls
never watch), so the operator is fully up, not merely past its startup handlers.  The
operator is namespaced: namespaces never finalize on this server (no controller), so a
cluster-wide one would see every earlier test's objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import threading
from collections.abc import AsyncIterator, Collection
from typing import Any, Final

import kopf

from mailtls_operator.controller import operator_options

from .auditlog import AuditTail
from .controlplane import ControlPlane
from .pki import ADMIN_USER

LOGIN_HANDLER_ID: Final = "testbed-controlplane-login"


def fast_settings() -> kopf.OperatorSettings:
    """Kopf settings that keep tests fast: no peering, no CRD scanning, short backoffs
    and timeouts."""
    settings = kopf.OperatorSettings()
    settings.peering.standalone = True
    settings.scanning.disabled = True
    settings.networking.error_backoffs = [0.1, 0.2, 0.5]
    settings.networking.request_timeout = 5
    settings.watching.connect_timeout = 2
    settings.queueing.idle_timeout = 0.5
    settings.queueing.exit_timeout = 1
    return settings


def watched_plurals(registry: kopf.OperatorRegistry) -> set[str]:
    """The resources (plural names) Kopf will watch for this registry's handlers."""
    selectors = (registry._indexing.get_all_selectors() | registry._watching.get_all_selectors()
                 | registry._spawning.get_all_selectors() | registry._changing.get_all_selectors())
    return {str(s.plural or s.any_name) for s in selectors if s.plural or s.any_name}


def _set_login(registry: kopf.OperatorRegistry, plane: ControlPlane | None) -> None:
    """(Re)point the registry at this server as its admin: one login handler of ours,
    replaced per run so that a registry shared between runs never keeps a dead server."""
    handlers = registry._activities._handlers
    handlers[:] = [h for h in handlers if h.id != LOGIN_HANDLER_ID]
    if plane is not None:
        info = kopf.ConnectionInfo(server=plane.url, ca_path=str(plane.ca_file),
                                   certificate_path=str(plane.admin_cert),
                                   private_key_path=str(plane.admin_key),
                                   default_namespace="default")

        @kopf.on.login(registry=registry, id=LOGIN_HANDLER_ID)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return info


@dataclasses.dataclass
class RunningOperator:
    """A Kopf operator running in its own thread and event loop."""

    thread: threading.Thread
    stop_flag: threading.Event
    ready_flag: threading.Event
    settings: kopf.OperatorSettings
    memo: Any
    watched: set[str]
    startup_seconds: float = math.nan
    errors: list[BaseException] = dataclasses.field(default_factory=list)


def _watching(log: AuditTail, namespaces: Collection[str], plurals: set[str]) -> bool:
    """Kopf has opened a watch on every resource of ``plurals`` in every namespace."""
    log.poll()
    seen = {(r.namespace, r.resource) for r in log.select("watch", user=ADMIN_USER)}
    return all((ns, plural) in seen for ns in namespaces for plural in plurals)


@contextlib.asynccontextmanager
async def run_operator(plane: ControlPlane, registry: kopf.OperatorRegistry, *,
                       namespaces: Collection[str], memo: Any = None,
                       settings: kopf.OperatorSettings | None = None,
                       startup_timeout: float = 30.0,
                       stop_timeout: float = 15.0) -> AsyncIterator[RunningOperator]:
    """Run ``registry`` in ``namespaces`` until the block ends; the block starts once
    every resource it handles is watched there.  Stopped in any case (its stop bounded
    by ``stop_timeout``); a crash fails the caller."""
    if not namespaces:
        raise ValueError("name the namespaces: a cluster-wide operator here sees every "
                         "earlier test's objects")
    loop = asyncio.get_running_loop()
    settings = settings if settings is not None else fast_settings()
    plurals = watched_plurals(registry)
    stop_flag, ready_flag = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    audit = None
    if plane.audit_log is not None:
        audit = AuditTail(plane.audit_log, lambda path: plane.request("GET", path))

    def target() -> None:
        try:
            asyncio.run(kopf.operator(
                registry=registry, settings=settings, standalone=True, memo=memo,
                clusterwide=False, namespaces=list(namespaces),
                stop_flag=stop_flag, ready_flag=ready_flag, **operator_options()))
        except BaseException as e:  # reported in the test, not lost in the thread
            errors.append(e)

    thread = threading.Thread(target=target, name="kopf-operator", daemon=True)
    running = RunningOperator(thread, stop_flag, ready_flag, settings, memo, plurals,
                              errors=errors)

    def up() -> bool:
        if not thread.is_alive():
            return True
        return ready_flag.is_set() and (audit is None or _watching(audit, namespaces, plurals))

    _set_login(registry, plane)
    started = loop.time()
    thread.start()
    try:
        while not await asyncio.to_thread(up):
            if loop.time() - started > startup_timeout:
                raise TimeoutError(f"the operator was not watching {sorted(plurals)} in "
                                   f"{sorted(namespaces)} within {startup_timeout:g} s")
            await asyncio.sleep(0.05)
        if errors or not thread.is_alive():
            raise RuntimeError(f"the operator died at startup: {errors!r}")
        running.startup_seconds = loop.time() - started
        yield running
    finally:
        stop_flag.set()
        await asyncio.to_thread(thread.join, stop_timeout)
        _set_login(registry, None)
        if thread.is_alive():
            raise RuntimeError(f"the operator did not stop within {stop_timeout} s")
    if errors:
        raise RuntimeError("the operator crashed") from errors[0]
