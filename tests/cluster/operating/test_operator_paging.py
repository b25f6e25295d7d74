"""The operator's paged list (mailtls_operator.kube) against the real server's continue
tokens when etcd is compacted in the middle of a listing (issue 23, item 5).

Measured on kube-apiserver v1.35.4 with its default watch cache: the continuation is
served from the cache, so a compaction in between does not expire the token (no 410) and
the listing completes with every object once. The operator's 410 branch (start over) is
therefore only reachable against the emulation (tests/integration/test_paged_lists.py),
or against a server without a watch cache."""

from __future__ import annotations

import kubernetes.client
import pytest

from mailtls_operator.kube import PAGE, Kube
from testbed.controlplane import ControlPlane

from .audit import AuditLog
from .helpers import PLURAL, Cluster, policy

pytestmark = pytest.mark.cluster


async def test_a_listing_across_an_etcd_compaction_completes_with_every_object_once(
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
    audit.barrier()
    lists = audit.select("list", PLURAL, where=lambda r: r.namespace == ns)
    pages = [(bool(r.param("continue")), r.code) for r in lists]
    if any(code == 410 for _, code in pages):  # a server that lists from etcd: start over
        assert len(names) == PAGE + n and pages == [
            (False, 200), (True, 410), (False, 200), (True, 200)], pages
    else:  # v1.35.4 with its watch cache: the token outlives the compaction
        assert len(names) == n and pages == [(False, 200), (True, 200)], pages
