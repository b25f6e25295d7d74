"""A good citizen of a real API server, counted from its audit log: bursts coalesce into a
few ConfigMap writes, one status patch per policy, no routine Events, label-selected
watches, paged lists on restart, a restart that writes nothing, and status writes that
never feed back into more writes."""

from __future__ import annotations

import pytest

from mailtls_operator.kube import PAGE
from testbed.controlplane import Identity

from .audit import WRITE_VERBS, AuditLog
from .conftest import StartOperator
from .helpers import PLURAL, Cluster, policy, until

pytestmark = pytest.mark.cluster


def test_a_burst_of_200_applies_costs_a_few_configmap_writes_and_one_status_patch_each(
        cluster: Cluster, start_operator: StartOperator, audit: AuditLog,
        operator_identity: Identity) -> None:
    ns, n, user = cluster.ns, 200, operator_identity.user
    start_operator("--debounce", "0.5", "--max-delay", "5")
    audit.mark()
    objs = [policy(f"p{i:03d}", ns, destinations=[f"d{i}.example"],
                   level=("may", "encrypt")[i % 2]) for i in range(n)]
    objs.append(policy("loser", ns, destinations=["d0.example"], level="none"))
    cluster.apply_many(objs)
    until(lambda: len(cluster.table() or []) == n, 60, what=f"{n} entries")
    until(lambda: _all_observed(cluster, n + 1), 60, what="every policy's status", every=0.5)
    until(lambda: ("Conflict", "loser") in cluster.policy_events(), what="the Conflict event")
    audit.barrier()
    cm_writes = audit.count(WRITE_VERBS, "configmaps", user=user)
    assert 1 <= cm_writes <= 3, cm_writes
    status = audit.select("patch", PLURAL, subresource="status", user=user)
    assert len(status) <= 1.1 * (n + 1), len(status)
    assert all(r.code == 200 for r in status)
    assert audit.count(WRITE_VERBS, PLURAL, user=user) == 0  # never the main resource
    # only the Conflict of the losing policy is for a person to act on
    assert set(cluster.policy_events()) == {("Conflict", "loser")}
    writes = audit.count(WRITE_VERBS, None, subresource="*", user=user)
    assert writes <= 2.1 * (n + 1), writes


def test_watches_and_lists_are_narrowed_by_label_and_unrelated_objects_are_not_read(
        cluster: Cluster, start_operator: StartOperator, audit: AuditLog,
        operator_identity: Identity) -> None:
    ns = cluster.ns
    for i in range(5):
        cluster.create_pod({
            "metadata": {"name": f"web-{i}", "labels": {"app": "web"}},
            "spec": {"nodeName": "nowhere", "containers": [{"name": "web", "image": "nginx"}]}})
        cluster.create_configmap({
            "metadata": {"name": f"web-config-{i}", "labels": {"app": "web"}},
            "data": {"big": "x" * 20_000}})
    start_operator()
    cluster.apply(policy("p", ns, destinations=["a.example"], level="encrypt"))
    until(lambda: cluster.table() == ["a.example encrypt"], what="the table")
    audit.barrier()
    reads = audit.select(("list", "watch"), None, user=operator_identity.user,
                         where=lambda r: r.resource in ("pods", "configmaps"))
    assert {(r.resource, r.verb) for r in reads} >= {("pods", "watch"),
                                                     ("configmaps", "watch")}, reads
    selectors: dict[str, set[str | None]] = {}
    for r in reads:
        selectors.setdefault(r.resource or "", set()).add(r.label_selector)
    assert selectors == {"pods": {"mailtls.io/instance"},
                         "configmaps": {"app.kubernetes.io/managed-by=mailtls-operator"}}
    assert all(r.namespace == ns for r in reads)  # namespaced: -n scopes every request


def test_a_restart_lists_in_pages_and_writes_nothing(
        cluster: Cluster, start_operator: StartOperator, audit: AuditLog,
        operator_identity: Identity) -> None:
    ns, n, user = cluster.ns, 2 * PAGE + 1, operator_identity.user  # three pages
    first = start_operator(name="first")
    cluster.apply_many(policy(f"p{i:04d}", ns, destinations=[f"d{i}.example"],
                              level="encrypt") for i in range(n))
    until(lambda: len(cluster.table() or []) == n, 120, what=f"{n} entries", every=0.5)
    until(lambda: _all_observed(cluster, n), 120, what="every status written", every=1.0)
    assert first.stop() == 0
    audit.mark()
    second = start_operator(name="second")
    second.wait_log(rf"seeded: {n} policies", 60)
    # A change to another instance after the seed: once its table is there, the operator
    # has been through its start-up work, and relay's table and statuses needed nothing.
    cluster.apply(policy("probe", ns, destinations=["z.example"], level="may",
                         instances=["edge"]))
    until(lambda: cluster.table("edge") == ["z.example may"], 30, what="the probe's table")
    until(lambda: cluster.condition("probe", "Ready"), 30, what="the probe's status")
    audit.barrier()
    lists = audit.select("list", PLURAL, user=user)
    assert {r.limit for r in lists} == {PAGE}, [r.uri for r in lists]
    assert sum(1 for r in lists if r.param("continue")) >= 2, [r.uri for r in lists]
    cm_writes = audit.select(WRITE_VERBS, "configmaps", user=user)
    assert [r.name for r in cm_writes] == ["edge-mailtls"], [r.uri for r in cm_writes]
    status = audit.select("patch", PLURAL, subresource="status", user=user)
    assert {r.name for r in status} == {"probe"}, len(status)


def test_status_writes_do_not_feed_back(
        cluster: Cluster, start_operator: StartOperator, audit: AuditLog,
        operator_identity: Identity) -> None:
    ns, n, user = cluster.ns, 10, operator_identity.user
    start_operator()
    audit.mark()
    cluster.apply_many(policy(f"p{i}", ns, destinations=[f"d{i}.example"], level="may")
                       for i in range(n))
    until(lambda: _all_observed(cluster, n), 30, what="every policy's status")
    audit.barrier()
    first = audit.count("patch", PLURAL, subresource="status", user=user)
    assert first <= 3 * n, first  # about one status write per policy per convergence
    status = cluster.status("p3")
    assert status["observedGeneration"] == 1
    assert [c["type"] for c in status["conditions"]][:2] == ["Ready", "Accepted"]
    assert status["instances"][0]["name"] == "relay"
    # Each status write comes back as a watch event of its policy. A change to another
    # instance, once converged, closes a window of several debounce periods in which a
    # loop would have written again; only the probe's own writes may be in it.
    audit.mark()
    cluster.apply(policy("probe", ns, destinations=["z.example"], level="may",
                         instances=["edge"]))
    until(lambda: cluster.table("edge") == ["z.example may"], what="the probe's table")
    until(lambda: cluster.condition("probe", "Ready"), what="the probe's status")
    audit.barrier()
    patched = {r.name for r in audit.select("patch", PLURAL, subresource="status", user=user)}
    assert patched == {"probe"}, patched
    written = {r.name for r in audit.select(WRITE_VERBS, "configmaps", user=user)}
    assert written == {"edge-mailtls"}, written


def _all_observed(cluster: Cluster, n: int) -> bool:
    """Every one of ``n`` policies has a status for its generation 1 with a Ready."""
    statuses = cluster.statuses()
    return len(statuses) == n and all(
        st.get("observedGeneration") == 1
        and any(c["type"] == "Ready" for c in st.get("conditions", []))
        for st in statuses.values())
