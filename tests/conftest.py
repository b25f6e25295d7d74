"""The real control plane, shared by every tier that uses it (tests/cluster, tests/postfix):
etcd and kube-apiserver built from the pinned Go modules (``make controlplane``), kwok
beside them, the project's CRDs and an admin client; one of each per test session, and a
fresh namespace per test.

A session shares one server because starting it costs seconds; tests stay independent
by working in their own namespace.  Fixtures are created on first use only: a session
that never asks for them starts nothing.  Where the binaries cannot be built here (no
Go), the tests that need them are skipped with build.sh's one-line reason, which
``make test`` has already shown loudly before pytest starts.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import kubernetes.client
import pytest

from testbed.controlplane import ControlPlane, ControlPlaneError, binaries_dir
from testbed.kwok import Kwok

REPO = Path(__file__).resolve().parents[1]
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
def kwok_node(kwok: Kwok) -> str:
    """One kwok Node for the session: pods bound to it (``spec.nodeName``) become Running
    and Ready, and are deleted, as a kubelet would do it."""
    name = "kwok-shared"
    kwok.add_node(name)
    return name


@pytest.fixture(scope="session")
def crds_applied(controlplane: ControlPlane) -> ControlPlane:
    """The project's CRDs, applied once (idempotent if the session fixture did it)."""
    controlplane.apply_crds(sorted((REPO / "crds").glob("*.yaml")))
    return controlplane


@pytest.fixture(scope="session")
def admin_client(crds_applied: ControlPlane) -> Iterator[kubernetes.client.ApiClient]:
    """The official client as the admin (``system:masters``), the CRDs installed."""
    with crds_applied.api_client() as client:
        yield client
