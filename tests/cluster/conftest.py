"""Fixtures of the cluster tests beyond the shared ones (``controlplane``, ``namespace``,
``kwok``, CRDs and admin client: tests/conftest.py): for tests that need pods made by the
real controllers, the workload cluster (``workload_cluster``: its own control plane plus
the controller-manager, the scheduler, kwok and the pod sandbox) with
``workload_namespace``.

Where the binaries cannot be built here (no Go) or the sandbox cannot run, the tests are
skipped with the reason.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from testbed.controlplane import ControlPlaneError, binaries_dir
from testbed.sandbox import sandbox_unavailable
from testbed.workloadcluster import WorkloadCluster

_names = itertools.count()


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
