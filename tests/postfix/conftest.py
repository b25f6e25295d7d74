"""Fixtures for the real-Postfix tests: instances ("pods"), sinks, a CA; all cleaned up.

Everything runs on loopback.  Every instance started here is stopped at
teardown (SIGTERM to its verified master, then SIGKILL to what is left of the
master's process group), every sink thread is joined.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from mailtls_operator.podrunner import PodRef
from testbed import (
    InstanceSettings,
    LocalCA,
    LocalInstance,
    LocalPodRunner,
    SmtpSink,
    plain_sink,
    postfix_unavailable,
    starttls_sink,
    stop_all,
)
from testbed.auditlog import AuditTail
from testbed.controlplane import ControlPlane
from testbed.postfixroot import VERSIONS, build_for

from .operating import Kubectl


@pytest.fixture(autouse=True)
def _require_postfix(request: pytest.FixtureRequest) -> None:
    """Skip tests marked ``postfix`` (not the pure ones) where Postfix cannot run."""
    if request.node.get_closest_marker("postfix") is None:
        return
    reason = postfix_unavailable()
    if reason is not None:
        pytest.skip(reason)


PodFactory = Callable[..., tuple[PodRef, LocalInstance]]

BOTH_VERSIONS = pytest.mark.parametrize("postfix_version", VERSIONS, indirect=True)
"""Module or test mark: run against the machine's Postfix 3.7 and trixie's 3.10."""


@pytest.fixture
def postfix_version(request: pytest.FixtureRequest) -> str:
    """Which Postfix ``make_pod`` starts: "3.7" unless a test is parametrized with
    :data:`BOTH_VERSIONS`.  Skips (with the way to fix it) where that one cannot run."""
    version: str = getattr(request, "param", "3.7")
    reason = postfix_unavailable(version)
    if reason is not None:
        pytest.skip(f"Postfix {version} cannot run here: {reason}")
    return version


@pytest.fixture
def runner() -> LocalPodRunner:
    return LocalPodRunner()


@pytest.fixture
def pods_dir() -> Iterator[Path]:
    """A 0755 directory for instances: Postfix daemons (user postfix) must reach into it,
    which pytest's 0700 ``tmp_path`` forbids.  Removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="mailtls-pods-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)
    build_for("3.10").forget(base)


@pytest.fixture
def make_pod(pods_dir: Path, runner: LocalPodRunner,
             postfix_version: str) -> Iterator[PodFactory]:
    """``make_pod(name, tls_policy="", transport="", namespace="mail", **settings)``: a
    started instance, registered with the runner as pod ``namespace/name``."""
    started: list[LocalInstance] = []

    def make(name: str, *, tls_policy: str = "", transport: str = "", start: bool = True,
             namespace: str = "mail", **settings: Any) -> tuple[PodRef, LocalInstance]:
        settings.setdefault("postfix", postfix_version)
        inst = LocalInstance(pods_dir / name, InstanceSettings(name=name, **settings))
        inst.create(tls_policy=tls_policy, transport=transport)
        started.append(inst)
        if start:
            inst.start()
        pod = PodRef(namespace, name)
        runner.add(pod, inst)
        return pod, inst

    yield make
    errors = stop_all(started)
    assert not any(i.running for i in started), "a Postfix master survived teardown"
    assert not errors, errors


@pytest.fixture
def sinks() -> Iterator[Callable[[SmtpSink], SmtpSink]]:
    """``sinks(sink)`` starts a sink and stops it at teardown."""
    running: list[SmtpSink] = []

    def start(sink: SmtpSink) -> SmtpSink:
        sink.start()
        running.append(sink)
        return sink

    yield start
    for sink in reversed(running):
        sink.stop()


@pytest.fixture
def plain(sinks: Callable[[SmtpSink], SmtpSink]) -> SmtpSink:
    """A sink without STARTTLS."""
    return sinks(plain_sink())


@pytest.fixture
def self_signed(sinks: Callable[[SmtpSink], SmtpSink], tmp_path: Path) -> SmtpSink:
    """A STARTTLS sink with a self-signed certificate for sink.mailtls.test."""
    return sinks(starttls_sink(tmp_path / "certs", name="self-signed"))


@pytest.fixture
def ca(pods_dir: Path) -> LocalCA:
    """A local CA; ``ca.pem_path`` is the trust anchor file for ``tafile``.

    Under ``pods_dir``: smtp(8) opens a policy's ``tafile`` as the unprivileged
    mail_owner, so it must be readable by user postfix (in pytest's 0700
    ``tmp_path`` it is not, and Postfix defers with "client TLS configuration
    problem").
    """
    return LocalCA(pods_dir / "ca")


@pytest.fixture
def ca_signed(sinks: Callable[[SmtpSink], SmtpSink], tmp_path: Path, ca: LocalCA) -> SmtpSink:
    """A STARTTLS sink whose certificate (sink.mailtls.test) the local CA issued."""
    return sinks(starttls_sink(tmp_path / "certs", name="ca-signed", ca=ca))


@pytest.fixture
def kubectl(admin_client: kubernetes.client.ApiClient, crds_applied: ControlPlane,
            namespace: str, kwok_node: str) -> Kubectl:
    """kubectl in the test's own namespace on the session's real control plane (the
    project's CRDs applied, pods bound to the session's kwok node)."""
    return Kubectl(crds_applied, admin_client, namespace, kwok_node)


@pytest.fixture
def audit_tail(crds_applied: ControlPlane) -> AuditTail:
    """kube-apiserver's audit log from the test's start on (``barrier()`` before counting:
    :meth:`Kubectl.count` does)."""
    plane = crds_applied
    if plane.audit_log is None:
        pytest.skip("this control plane writes no audit log")
    tail = AuditTail(plane.audit_log, lambda path: plane.request("GET", path))
    tail.barrier()
    return tail
