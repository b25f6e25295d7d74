"""Fixtures of the image tests: the images built once per session by ``images/build.sh``
(what ``make images`` runs), and the API emulation with ``pods/exec`` bridged to podman.

Skipped, with the reason, where podman cannot run containers (no podman, or ``podman
info`` fails); where it can, a failing build fails the tests.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator

import kmock
import kubernetes.client
import pytest

from tests.images.podexec import ExecApiServer
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


@pytest.fixture
async def apiserver(images: None) -> AsyncIterator[ExecApiServer]:
    """The API emulation on 127.0.0.1, serving pods/exec through podman exec."""
    async with ExecApiServer() as server, kmock.Server(server):
        try:
            yield server
        finally:
            await server.close_streams()
    if server.server_errors:
        pytest.fail(f"the test API server failed internally: {server.server_errors!r}")


@pytest.fixture
def kube_client(apiserver: ExecApiServer) -> Iterator[kubernetes.client.ApiClient]:
    configuration = kubernetes.client.Configuration()
    configuration.host = str(apiserver.url).rstrip("/")
    with kubernetes.client.ApiClient(configuration) as client:
        yield client
