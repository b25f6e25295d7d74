"""The operator's paged list (mailtls_operator.kube) against the real server's continue
tokens when etcd is compacted in the middle of a listing (issue 23, item 5).

Measured on kube-apiserver v1.35.4 with its default watch cache: a continuation is served
from the cache while the cache still holds the token's revision, so a compaction alone
does not expire the token (no 410) and the listing completes with every object once.
Once the cache starts over above the compacted revision (kube-apiserver restarted, as in
an upgrade, or the cache's window moved on in a busy cluster), the continuation goes to
etcd, which answers 410 Gone ("The provided continue parameter is too old"): the
operator starts the listing over, as kubectl's pager does."""

from __future__ import annotations

from collections.abc import Callable

import kubernetes.client
import pytest

from mailtls_operator.kube import PAGE, Kube
from testbed.controlplane import ControlPlane

from .audit import AuditLog
from .helpers import PLURAL, Cluster, policy

pytestmark = pytest.mark.cluster


def _seed(cluster: Cluster, n: int) -> None:
    cluster.apply_many(policy(f"p{i:04d}", cluster.ns, destinations=[f"d{i}.example"],
                              level="encrypt") for i in range(n))


async def _list_across(cluster: Cluster, admin_client: kubernetes.client.ApiClient,
                       between: Callable[[], object]) -> list[str]:
    """The names ``Kube.list_policies`` yields, with ``between()`` run after the first
    page: history moves on (an unrelated write) and is compacted, and whatever else."""
    names: list[str] = []
    async for obj in Kube(admin_client).list_policies(cluster.ns):
        names.append(obj["metadata"]["name"])
        if len(names) == PAGE:
            cluster.create_configmap({"metadata": {"name": "later"}})
            between()
    return names


def _pages(audit: AuditLog, ns: str) -> list[tuple[bool, int | None]]:
    """(with a continue token, the server's code) of each policy list in ``ns``."""
    audit.barrier()
    lists = audit.select("list", PLURAL, where=lambda r: r.namespace == ns)
    return [(bool(r.param("continue")), r.code) for r in lists]


async def test_a_listing_across_an_etcd_compaction_completes_with_every_object_once(
        cluster: Cluster, controlplane: ControlPlane, audit: AuditLog,
        admin_client: kubernetes.client.ApiClient) -> None:
    ns, n = cluster.ns, PAGE + 10  # two pages
    _seed(cluster, n)
    audit.mark()
    names = await _list_across(cluster, admin_client, controlplane.compact_etcd)
    assert len(names) == len(set(names)) == n
    assert _pages(audit, ns) == [(False, 200), (True, 200)]  # the cache kept the token good


async def test_an_expired_continue_token_gets_410_and_the_listing_starts_over(
        cluster: Cluster, controlplane: ControlPlane, audit: AuditLog,
        admin_client: kubernetes.client.ApiClient) -> None:
    ns, n = cluster.ns, 2 * PAGE + 1  # three pages
    _seed(cluster, n)
    audit.mark()

    def compact_and_restart() -> None:  # the watch cache starts after the compaction
        controlplane.compact_etcd()
        controlplane.restart_apiserver()

    names = await _list_across(cluster, admin_client, compact_and_restart)
    assert len(set(names)) == n
    assert len(names) == PAGE + n  # the first page again, then everything
    assert _pages(audit, ns) == [(False, 200), (True, 410),
                                 (False, 200), (True, 200), (True, 200)]
