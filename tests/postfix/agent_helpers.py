"""Agents for local Postfix pods, run in the test's loop against the API emulation."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from mailtls_operator.agent.api import AgentApi
from mailtls_operator.agent.converge import Converger, PodSettings
from mailtls_operator.agent.loop import Agent, LoopSettings
from mailtls_operator.agent.runner import ProcessRunner
from mailtls_operator.configmap import configmap_bodies
from mailtls_operator.podrunner import ExecResult, PodRef
from testbed import LocalInstance
from testbed.apiserver import ApiServer


def agent_pod(name: str, inst: LocalInstance, instance: str = "relay") -> dict[str, Any]:
    """A pod of the agent strategy, as the chart's example sets it."""
    return {"metadata": {"name": name, "namespace": "mail",
                         "labels": {"mailtls.io/instance": instance},
                         "annotations": {"mailtls.io/strategy": "agent",
                                         "mailtls.io/map-path": str(inst.map_path),
                                         "mailtls.io/map-type": inst.settings.map_type}},
            "spec": {"containers": [{"name": "postfix", "image": "postfix"},
                                    {"name": "agent", "image": "mailtls"}]},
            "status": {"phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True"}]}}


class PodProcessRunner(ProcessRunner):
    """The agent's runner, its commands run with the pod's Postfix (3.10: in its root)."""

    def __init__(self, inst: LocalInstance) -> None:
        super().__init__(env=inst.env)
        self.inst = inst

    async def run(self, pod: PodRef, argv: Sequence[str], *, stdin: bytes | None = None,
                  timeout: float = 60.0) -> ExecResult:
        if self.inst.settings.postfix == "3.7":  # the machine's: in-process file steps too
            return await super().run(pod, argv, stdin=stdin, timeout=timeout)
        return await super().run(pod, self.inst.command(argv), stdin=stdin, timeout=timeout)


def make_agent(apiserver: ApiServer, name: str, inst: LocalInstance, **loop: Any) -> Agent:
    settings = PodSettings("mail", name, str(inst.map_path), inst.settings.map_type,
                           timeout=30.0, probe_interval=0)
    opts = {"observe_interval": 0.3, "retry_base": 0.05, "retry_max": 0.2,
            "watch_timeout": 5, **loop}
    return Agent(AgentApi(str(apiserver.url), timeout=2.0),
                 Converger(PodProcessRunner(inst), settings),
                 LoopSettings("relay", inst.configmap_dir, None, **opts))


@asynccontextmanager
async def running(agents: Sequence[Agent]) -> AsyncIterator[Sequence[Agent]]:
    tasks = [asyncio.create_task(a.run()) for a in agents]
    try:
        yield agents
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for a in agents:
            await a.api.close()


@contextlib.contextmanager
def small_configmap_limits(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """ConfigMap limits small enough that a few hundred entries are split into parts,
    patched where ``configmap_bodies`` reads them (whichever module that is)."""
    module = sys.modules[configmap_bodies.__module__]
    cache = getattr(module, "_CACHE", None)
    if cache is not None:
        cache.clear()
    monkeypatch.setattr(module, "COMPRESS_ABOVE", 1024)
    monkeypatch.setattr(module, "BODY_MAX", 2048)
    monkeypatch.setattr(module, "CHUNK", 1024)
    try:
        yield
    finally:
        if cache is not None:
            cache.clear()
