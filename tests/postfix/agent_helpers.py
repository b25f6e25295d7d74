"""Agents for local Postfix pods, run in the test's loop against the real kube-apiserver.

Each agent holds a token of its pod (TokenRequest bound to the Pod, as the kubelet
projects it) of a ServiceAccount that may do what the agent does and nothing more
(``mailtls_operator.agent.api.API_CALLS``, in the test's namespace).  The chart's exact
Role and admission policy are proven in tests/cluster/test_agent_admission_real.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import kubernetes.client
import pytest

from mailtls_operator.agent.api import API_CALLS, AgentApi
from mailtls_operator.agent.converge import Converger, PodSettings
from mailtls_operator.agent.loop import Agent, LoopSettings
from mailtls_operator.agent.report import ANN_REPORT, AgentReport, parse_report
from mailtls_operator.agent.runner import ProcessRunner
from mailtls_operator.configmap import configmap_bodies
from mailtls_operator.podrunner import ExecResult, PodRef
from mailtls_operator.render import Tables
from testbed import LocalInstance

from .operating import INSTANCE, Kubectl

AGENT_SA = "mailtls-agent"


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


def grant_agents(kubectl: Kubectl) -> str:
    """The agents' ServiceAccount in the test's namespace, with a Role of exactly the
    agent's calls; returns its user name as the audit log shows it."""
    ns = kubectl.ns
    rules = [{"apiGroups": [group], "resources": [resource], "verbs": [verb]}
             for verb, group, resource in sorted(API_CALLS)]
    kubectl.core.create_namespaced_service_account(ns, {"metadata": {"name": AGENT_SA}})
    rbac: Any = kubernetes.client.RbacAuthorizationV1Api(kubectl.client)
    rbac.create_namespaced_role(ns, {"metadata": {"name": AGENT_SA}, "rules": rules})
    rbac.create_namespaced_role_binding(ns, {
        "metadata": {"name": AGENT_SA},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": AGENT_SA},
        "subjects": [{"kind": "ServiceAccount", "name": AGENT_SA, "namespace": ns}]})
    return f"system:serviceaccount:{ns}:{AGENT_SA}"


def pod_token(kubectl: Kubectl, pod: str) -> str:
    """A token of the agents' ServiceAccount bound to ``pod``."""
    return kubectl.plane.service_account_token(kubectl.ns, AGENT_SA, pod=pod)


def make_agent(kubectl: Kubectl, name: str, inst: LocalInstance, *, url: str | None = None,
               **loop: Any) -> Agent:
    """The agent of pod ``name`` with its pod-bound token, talking to the API server (or
    to ``url``, a proxy in front of it)."""
    settings = PodSettings(kubectl.ns, name, str(inst.map_path), inst.settings.map_type,
                           timeout=30.0, probe_interval=0)
    opts = {"observe_interval": 0.3, "retry_base": 0.05, "retry_max": 0.2,
            "watch_timeout": 5, **loop}
    token = pod_token(kubectl, name)
    api = AgentApi(url or kubectl.plane.url, token=lambda: token,
                   ca_file=str(kubectl.plane.ca_file), timeout=2.0)
    return Agent(api, Converger(PodProcessRunner(inst), settings),
                 LoopSettings(INSTANCE, inst.configmap_dir, None, **opts))


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


def report(kubectl: Kubectl, pod: str) -> AgentReport | None:
    """What the pod's agent last reported in its annotation, if anything."""
    text = ((kubectl.pod(pod) or {}).get("metadata", {}).get("annotations") or {}).get(
        ANN_REPORT)
    return parse_report(text) if text else None


def publish(kubectl: Kubectl, tables: Tables) -> None:
    """The ConfigMaps of ``tables`` for instance relay, as the operator writes them."""
    for body in configmap_bodies(kubectl.ns, INSTANCE, tables):
        kubectl.put_configmap(body)


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
