"""Fixtures for integration tests: a faithful API server on loopback, the official client,
and the operator runner bound to that server.

Every test gets a fresh server (state, log and faults never leak between tests). The
server's own bugs must not pass as operator behaviour, so an unexpected exception inside it
fails the test at teardown.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import kmock
import kopf
import kubernetes.client
import pytest

from testbed.apiserver import ApiServer, RunningOperator, RunOperator
from testbed.apiserver import run_operator as _run_operator
from tests.integration.helpers import Cluster


@pytest.fixture
async def apiserver() -> AsyncIterator[ApiServer]:
    """The API server on 127.0.0.1 (``apiserver.url``) with our resources and CRD declared."""
    async with ApiServer() as server, kmock.Server(server):
        try:
            yield server
        finally:
            await server.close_streams()  # else aiohttp waits for open watches at shutdown
    if server.server_errors:
        pytest.fail(f"the test API server failed internally: {server.server_errors!r}")


@pytest.fixture
def kube_client(apiserver: ApiServer) -> Iterator[kubernetes.client.ApiClient]:
    """The official client aimed at the server. It is synchronous: call it through
    ``asyncio.to_thread`` so that the server, in this same loop, can answer."""
    configuration = kubernetes.client.Configuration()
    configuration.host = str(apiserver.url).rstrip("/")
    with kubernetes.client.ApiClient(configuration) as client:
        yield client


@pytest.fixture
def run_operator(apiserver: ApiServer) -> RunOperator:
    """``async with run_operator(registry, memo=...) as op:`` -- an operator on this server.

    Keyword arguments: ``memo``, ``settings`` (default: ``fast_settings()``), ``namespaces``
    (default: cluster-wide), ``startup_timeout``, ``stop_timeout``.
    """
    def bound(registry: kopf.OperatorRegistry,
              **kwargs: Any) -> AbstractAsyncContextManager[RunningOperator]:
        return _run_operator(apiserver, registry, **kwargs)
    return functools.update_wrapper(bound, _run_operator, assigned=("__doc__",))


@pytest.fixture
def cluster(apiserver: ApiServer, kube_client: kubernetes.client.ApiClient) -> Cluster:
    """kubectl for the tests: apply/delete policies, read ConfigMaps and status."""
    return Cluster(apiserver, kube_client)
