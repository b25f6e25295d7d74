"""The operator's paged list (mailtls_operator.kube) against the real server's continue
tokens: a token older than an etcd compaction answers 410 Gone, and the listing starts
over instead of failing or losing objects (issue 23, item 5)."""

from __future__ import annotations

import kubernetes.client
import pytest

from mailtls_operator.kube import PAGE, Kube
from testbed.controlplane import ControlPlane

from .audit import AuditLog
from .helpers import PLURAL, Cluster, policy

pytestmark = pytest.mark.cluster


async def test_a_continue_token_older_than_a_compaction_starts_the_listing_over(
        cluster: Cluster, controlplane: ControlPlane, audit: AuditLog,
        admin_client: kubernetes.client.ApiClient) -> None:
    ns, n = cluster.ns, PAGE + 10  # two pages
    cluster.apply_many(policy(f"p{i:04d}", ns, destinations=[f"d{i}.example"],
                              level="encrypt") for i in range(n))
    audit.mark()
    names: list[str] = []
    async for obj in Kube(admin_client).list_policies(ns):
        names.append(obj["metadata"]["name"])
        if len(names) == PAGE:
            # history moves on and is compacted: the continue token's revision is gone
            cluster.create_configmap({"metadata": {"name": "later"}})
            controlplane.compact_etcd()
    assert len(set(names)) == n
    assert len(names) == PAGE + n, len(names)  # the first page again, then everything
    audit.barrier()
    lists = audit.select("list", PLURAL, where=lambda r: r.namespace == ns)
    assert [(bool(r.param("continue")), r.code) for r in lists] == [
        (False, 200), (True, 410), (False, 200), (True, 200)], [(r.uri, r.code) for r in lists]
