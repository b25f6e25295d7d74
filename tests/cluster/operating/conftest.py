"""Fixtures for ``mailtls run`` against the real kube-apiserver (issue 23, items 3 and 5).

The operator runs as a subprocess, namespaced to the test's namespace (namespaces are
never finalized here, so a cluster-wide operator would see every earlier test's objects),
with the token of a ServiceAccount of its own bound to ``cluster-admin``: least privilege
is proven elsewhere; here the identity only tells its requests from the test's in the
audit log. Its log is printed when a test fails.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from testbed.controlplane import ControlPlane, Identity

from .audit import AuditLog
from .helpers import Cluster, OperatorProcess
from .webhook import FaultWebhook, fault_webhook

REPO = Path(__file__).resolve().parents[3]
FAST = ("--debounce", "0.15", "--max-delay", "1.5")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def audit(crds_applied: ControlPlane, admin_client: kubernetes.client.ApiClient) -> AuditLog:
    """The server's audit log, read from the start of the test on."""
    path = getattr(crds_applied, "audit_log", None)
    if path is None:
        pytest.skip("this control plane writes no audit log")
    log = AuditLog(path, admin_client)
    log.mark()
    return log


@pytest.fixture
def cluster(admin_client: kubernetes.client.ApiClient, namespace: str) -> Cluster:
    return Cluster(admin_client, namespace)


def admin_service_account(controlplane: ControlPlane, cluster: Cluster, sa: str,
                          kubeconfig: Path, *, pod: str | None = None) -> Identity:
    """ServiceAccount ``sa`` of the test's namespace bound to cluster-admin, and a
    kubeconfig with a token of it (bound to ``pod`` if given; the pod must exist)."""
    return controlplane.admin_identity(cluster.ns, sa, kubeconfig, pod=pod)


@pytest.fixture
def operator_identity(crds_applied: ControlPlane, cluster: Cluster,
                      tmp_path: Path) -> Identity:
    """The operator's own ServiceAccount, so the audit log tells its requests apart."""
    return admin_service_account(crds_applied, cluster, "mailtls-operator",
                                 tmp_path / "operator.kubeconfig")


@pytest.fixture
def faults(admin_client: kubernetes.client.ApiClient, namespace: str,
           operator_identity: Identity) -> Iterator[FaultWebhook]:
    """An admission webhook that refuses the operator's writes in the test's namespace as
    the test injects (``faults.inject(Fault(...))``); everyone else's pass."""
    with fault_webhook(admin_client, namespace, operator_identity.user) as hook:
        yield hook


StartOperator = Callable[..., OperatorProcess]


@pytest.fixture
def start_operator(operator_identity: Identity, namespace: str, tmp_path: Path,
                   request: pytest.FixtureRequest) -> Iterator[StartOperator]:
    """``start_operator(*args, name="op", namespaces=None, env=None)``: ``mailtls run``
    in the test's namespace (or ``namespaces``) with fast debounce, healthy before it returns. Every
    process is stopped at teardown; a failed test prints their logs."""
    started: list[OperatorProcess] = []

    def start(*args: str, name: str = "op", namespaces: list[str] | None = None,
              wait: bool = True, env: dict[str, str] | None = None) -> OperatorProcess:
        scope = [a for ns in (namespaces or [namespace]) for a in ("-n", ns)]
        proc = OperatorProcess(operator_identity.kubeconfig, tmp_path / f"{name}.log",
                               [*scope, *FAST, *args], env=env).start()
        started.append(proc)
        if wait:
            proc.wait_healthy()
        return proc

    yield start
    codes = [p.stop() for p in started]
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for p in started:
            print(f"--- {p.log} (exit {p.proc.returncode if p.proc else None}) ---")
            print(p.tail(120))
    for p, code in zip(started, codes, strict=True):
        assert p.tracebacks_ok or "Traceback" not in p.running_log, \
            f"{p.log} has a traceback:\n{p.tail(80)}"
        assert code in (0, -9, None) or p.exit_expected, \
            f"{p.log} exited with {code}:\n{p.tail(40)}"
