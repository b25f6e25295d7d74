"""Fixtures for tests against a real control plane: etcd and kube-apiserver built from
the pinned Go modules (``make controlplane``), one per test session, and a fresh
namespace per test; and, for tests that need pods made by the real controllers, the
workload cluster (``workload_cluster``: its own control plane plus the controller-manager,
the scheduler, kwok and the pod sandbox) with ``workload_namespace``.

A session shares one server because starting it costs seconds; tests stay independent
by working in their own namespace.  Where the binaries cannot be built here (no Go),
the tests are skipped with build.sh's one-line reason, which ``make test`` has already
shown loudly before pytest starts.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.controlplane import ControlPlane, ControlPlaneError, binaries_dir
from testbed.kwok import Kwok
from testbed.sandbox import sandbox_unavailable
from testbed.workloadcluster import WorkloadCluster

_names = itertools.count()


@pytest.fixture(scope="session")
def controlplane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A running etcd + kube-apiserver with an admin kubeconfig (``.kubeconfig``)."""
    try:
        binaries = binaries_dir()
    except ControlPlaneError as exc:
        pytest.skip(f"no control plane binaries: {exc}")
    workdir: Path = tmp_path_factory.mktemp("controlplane")
    with ControlPlane(workdir, binaries=binaries) as plane:
        yield plane


@pytest.fixture
def namespace(controlplane: ControlPlane) -> Iterator[str]:
    """A fresh namespace with its ``default`` ServiceAccount (no controller-manager here
    creates it), deleted after the test.  Without a namespace controller the namespace
    stays Terminating with its content; names never repeat within a session."""
    name = f"t{next(_names)}"
    controlplane.request("POST", "/api/v1/namespaces", {
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    controlplane.request("POST", f"/api/v1/namespaces/{name}/serviceaccounts", {
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}})
    yield name
    controlplane.request("DELETE", f"/api/v1/namespaces/{name}")


@pytest.fixture(scope="session")
def kwok(controlplane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kwok]:
    """kwok beside the session's control plane: it serves the kubelet API on loopback
    for the Nodes a test creates with :meth:`Kwok.add_node` (names never repeat)."""
    with Kwok(controlplane, tmp_path_factory.mktemp("kwok")) as fake:
        yield fake


@pytest.fixture(scope="session")
def workload_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkloadCluster]:
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok with two
    nodes, and the pod sandbox that runs the Postfix pods' containers locally
    (``testbed/workloadcluster.py``).  A control plane of its own: the ``controlplane``
    fixture's tests rely on no controller acting."""
    try:
        binaries = binaries_dir()
    except ControlPlaneError as exc:
        pytest.skip(f"no control plane binaries: {exc}")
    if reason := sandbox_unavailable():
        pytest.skip(reason)
    with WorkloadCluster(tmp_path_factory.mktemp("kwok-cluster"), binaries=binaries) as cluster:
        yield cluster
        assert not cluster.sandbox.failures, f"pods the sandbox could not start: " \
            f"{cluster.sandbox.failures}; see {cluster.sandbox.workdir / 'sandbox.log'}"


@pytest.fixture
def workload_namespace(workload_cluster: WorkloadCluster) -> Iterator[str]:
    """A fresh namespace of the workload cluster, once the ServiceAccount controller has
    given it its ``default`` ServiceAccount; deleted (for real: the namespace
    controller empties it) after the test."""
    name = f"k{next(_names)}"
    plane = workload_cluster.plane
    plane.request("POST", "/api/v1/namespaces", {
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    plane.kubectl("wait", "-n", name, "--for=create", "serviceaccount/default",
                  "--timeout=30s", timeout=40)
    yield name
    plane.request("DELETE", f"/api/v1/namespaces/{name}")
