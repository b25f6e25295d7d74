"""A good citizen of a shared cluster: narrow watches, one status write per policy, Events
only for what a person must act on (issue 13; figures at scale in ``make bench``)."""

from __future__ import annotations

from typing import Any

import pytest

from testbed.apiserver import ApiServer
from tests.integration.helpers import PLURAL, Cluster, idle, operating, policy

pytestmark = pytest.mark.integration

BIG = "x" * 20_000  # a large unrelated object: its bytes must never reach the operator


def _unrelated(i: int) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = {"metadata": {"name": f"web-{i}", "namespace": "mail", "labels": {"app": "web"},
                        "annotations": {"big": BIG}},
           "spec": {"containers": [{"name": "web", "image": "nginx"}]},
           "status": {"phase": "Running"}}
    cm = {"metadata": {"name": f"web-config-{i}", "namespace": "mail",
                       "labels": {"app": "web"}}, "data": {"big": BIG}}
    return pod, cm


async def test_watches_and_lists_are_narrowed_by_label_and_unrelated_objects_cost_nothing(
        cluster: Cluster, apiserver: ApiServer, run_operator: Any, kube_client: Any) -> None:
    for i in range(50):
        pod, cm = _unrelated(i)
        apiserver.seed("v1/pods", pod)
        apiserver.seed("v1/configmaps", cm)
    apiserver.reset_log()
    async with operating(run_operator, kube_client) as op:
        await cluster.apply(policy("p", destinations=["a.example"], level="encrypt"))
        await cluster.until(lambda: cluster.table("mail", "relay") == ["a.example encrypt"])
        await cluster.until(lambda: idle(op))
        reads = [r for r in apiserver.request_log if r.verb in ("list", "watch")
                 and r.resource in ("pods", "configmaps")]
        assert {(r.resource, r.verb) for r in reads} >= {("pods", "watch"),
                                                         ("configmaps", "watch")}
        selectors: dict[str, set[str | None]] = {r.resource: set() for r in reads}
        for r in reads:
            selectors[r.resource].add(r.label_selector)
        assert selectors == {"pods": {"mailtls.io/instance"},
                             "configmaps": {"app.kubernetes.io/managed-by=mailtls-operator"}}
        assert not any(name.startswith("web") for _, name in op.world.pods)
        assert not any(name.startswith("web") for _, name in op.world.configmaps)


async def test_a_bulk_load_costs_one_status_patch_per_policy_and_no_routine_events(
        cluster: Cluster, apiserver: ApiServer, run_operator: Any, kube_client: Any) -> None:
    n = 60
    async with operating(run_operator, kube_client) as op:
        apiserver.reset_log()
        for i in range(n):
            apiserver.seed(PLURAL, policy(f"p{i:03d}", destinations=[f"d{i}.example"],
                                          level="encrypt"))
        apiserver.seed(PLURAL, policy("loser", destinations=["d0.example"], level="may"))
        await cluster.until(lambda: len(cluster.table("mail", "relay") or []) == n)
        await cluster.until(lambda: idle(op) and all(
            cluster.condition("mail", f"p{i:03d}", "Ready") for i in range(n)), timeout=30)
        await cluster.until(lambda: cluster.condition("mail", "loser", "Accepted"))
    patches = [r for r in apiserver.request_log
               if r.verb == "patch" and r.resource == PLURAL and r.subresource == "status"]
    assert len(patches) <= 1.1 * (n + 1), len(patches)
    events = apiserver.list_objects("v1/events", "mail") + apiserver.list_objects(
        "events.k8s.io/v1/events", "mail")
    ours = [e for e in events if (e.get("involvedObject") or e.get("regarding") or {}
                                  ).get("kind") == "MailTLSPolicy"]
    # only the Conflict of the losing policy is for a person to act on
    assert {(e.get("reason"), (e.get("involvedObject") or e.get("regarding") or {}).get("name"))
            for e in ours} == {("Conflict", "loser")}, ours
    writes = [r for r in apiserver.request_log if r.verb in ("create", "patch", "update",
                                                             "delete")]
    assert len(writes) <= 2.1 * (n + 1), len(writes)
