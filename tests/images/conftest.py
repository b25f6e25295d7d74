"""Fixtures of the image tests: the images built once per session by ``images/build.sh``
(what ``make images`` runs), the real control plane (etcd + kube-apiserver, the session
fixtures of tests/conftest.py), the chart's RBAC for the operator, and kwok with
``pods/exec`` mapped to ``podman exec`` (:mod:`tests.images.kwokexec`).

Skipped, with the reason, where podman cannot run containers (no podman, or ``podman
info`` fails) or the control plane cannot be built; where both can, a failing build
fails the tests.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from testbed.controlplane import ControlPlane
from testbed.kwok import Kwok
from tests.cluster.operating.conftest import audit  # noqa: F401 (the fixture)
from tests.cluster.rbac_setup import Install, installed
from tests.images.kwokexec import write_shims
from tests.images.pods import (
    BUILD,
    OPERATOR_IMAGE,
    POSTFIX_IMAGE,
    podman_env,
    remove_leftovers,
)


@functools.cache
def _unavailable() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (make system-deps installs it on Debian)"
    info = subprocess.run(["podman", "info"], capture_output=True, timeout=120,
                          env=podman_env(), check=False)
    if info.returncode != 0:
        return f"podman cannot run here: {info.stderr.decode(errors='replace').strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def images() -> Iterator[None]:
    """Both images, built (or found up to date) by images/build.sh with podman, under
    this checkout's own test tags (``make images`` builds ``:dev``)."""
    reason = _unavailable()
    if reason is not None:
        pytest.skip(reason)
    remove_leftovers()
    result = subprocess.run(["bash", str(BUILD), "images"], capture_output=True, timeout=1500,
                            env={**podman_env(), "CONTAINER_ENGINE": "podman",
                                 "OPERATOR_TAG": OPERATOR_IMAGE, "POSTFIX_TAG": POSTFIX_IMAGE},
                            check=False)
    if result.returncode != 0:
        pytest.fail(f"images/build.sh failed ({result.returncode}):\n"
                    f"{result.stderr.decode(errors='replace')[-6000:]}")
    yield
    remove_leftovers()
    # The operator image is rebuilt by every session anyway (images/build.sh builds it
    # without the cache on podman): do not leave one per checkout behind.
    subprocess.run(["podman", "rmi", "--force", OPERATOR_IMAGE], capture_output=True,
                   timeout=120, env=podman_env(), check=False)


@pytest.fixture(scope="session")
def cluster_with_crds(images: None, crds_applied: ControlPlane) -> ControlPlane:
    """The session's control plane with the project's CRDs, started after the images are
    built (a machine without podman never starts it)."""
    return crds_applied


@pytest.fixture
def install(cluster_with_crds: ControlPlane, namespace: str) -> Iterator[Install]:
    """The chart's ServiceAccount, roles and bindings (default scope, exec strategy),
    released into the test's namespace; Postfix pods and policies go to
    ``install.watched``."""
    with installed(cluster_with_crds, namespace, "cluster", "exec") as inst:
        yield inst


@pytest.fixture(scope="session")
def kwok_podman(cluster_with_crds: ControlPlane,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kwok]:
    """kwok whose mapped execs find the podman shims first on their PATH."""
    shims = write_shims(tmp_path_factory.mktemp("shims"))
    with Kwok(cluster_with_crds, tmp_path_factory.mktemp("kwok"), path=[shims],
              nodes="images") as fake:
        yield fake
