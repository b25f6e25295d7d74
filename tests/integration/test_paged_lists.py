"""Lists come in pages, as kubectl's do: a restart with 10,000 policies never holds them
all as one response (issue 13's quiet RSS after a restart; figures in ``make bench``)."""

from __future__ import annotations

from typing import Any

import kubernetes.client
import pytest

from mailtls_operator.kube import PAGE, Kube
from testbed.apiserver import ApiServer
from tests.integration.helpers import PLURAL, Cluster, idle, operating, policy

pytestmark = pytest.mark.integration

N = 2 * PAGE + 1  # three pages


def _seed(apiserver: ApiServer) -> None:
    for i in range(N):
        apiserver.seed(PLURAL, policy(f"p{i:04d}", destinations=[f"d{i}.example"],
                                      level="encrypt"))


def _policy_lists(apiserver: ApiServer) -> list[Any]:
    return [r for r in apiserver.request_log if r.verb == "list" and r.resource == PLURAL]


async def test_the_operator_and_kopf_list_policies_in_pages(
        cluster: Cluster, apiserver: ApiServer, run_operator: Any,
        kube_client: kubernetes.client.ApiClient) -> None:
    _seed(apiserver)
    apiserver.reset_log()
    async with operating(run_operator, kube_client) as op:
        await cluster.until(lambda: len(cluster.table("mail", "relay") or []) == N, timeout=60)
        await cluster.until(lambda: idle(op), timeout=60)
        lists = _policy_lists(apiserver)
        assert {r.limit for r in lists} == {PAGE}
        assert len(lists) >= 6  # three pages for the operator's own start, three for Kopf's
        assert sum(1 for _ in op.world.records("mail")) == N


async def test_an_expired_continue_token_starts_the_listing_over(
        apiserver: ApiServer, kube_client: kubernetes.client.ApiClient) -> None:
    _seed(apiserver)
    apiserver.reset_log()
    names: list[str] = []
    async for obj in Kube(kube_client).list_policies("mail"):
        names.append(obj["metadata"]["name"])
        if len(names) == PAGE:
            # history moves on and is compacted: the continue token is too old (410)
            apiserver.seed("v1/configmaps", {"metadata": {"name": "later", "namespace": "mail"}})
            apiserver.compact()
    assert len(set(names)) == N
    assert len(names) == PAGE + N  # the first page again, then everything
    assert len(_policy_lists(apiserver)) == 1 + 1 + 3  # page, the refused continue, 3 pages
