"""The chart's RBAC covers every API call the operator really makes, and nothing more.

The calls are recorded by the API server emulation while the real operator (Kopf + the
official client) does its whole job: policies of all kinds, an exec-strategy pod and a
restart-strategy pod, a hand-deleted ConfigMap, status, events.  Every recorded request must
be granted by the chart's default render; every grant must be either recorded here or a call
this scenario cannot make against the emulation (named below, with the reason).
"""

from __future__ import annotations

from typing import Any

import pytest

from testbed.apiserver import ApiServer
from tests.contract.kit import chart_objects, operator_grants
from tests.integration.helpers import Cluster, idle, operating, policy

pytestmark = pytest.mark.integration

LEADER = "leader election (--leader-elect): tests/integration/test_leader.py"

# Granted but not exercised against the emulation, each for a stated reason.
NOT_RECORDABLE = {
    ("", "pods/exec", "create"): "websocket exec: tested against a loopback server "
                                 "(tests/unit/test_execrunner.py), not the emulation",
    ("", "pods/exec", "get"): "the websocket upgrade request is a GET",
    ("", "pods", "patch"): "the applied-revision annotation after an exec rollout into a real "
                           "Postfix pod: asserted in tests/postfix/test_through_operator.py",
    ("apps", "deployments", "get"): "restart strategy with a Deployment owner",
    ("apps", "deployments", "patch"): "restart strategy with a Deployment owner",
    ("apps", "replicasets", "get"): "a Deployment pod's owner is its ReplicaSet",
    ("coordination.k8s.io", "leases", "get"): LEADER,
    ("coordination.k8s.io", "leases", "create"): LEADER,
    ("coordination.k8s.io", "leases", "patch"): LEADER,
}


def _pod(name: str, strategy: str, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "mail",
                         "labels": {"mailtls.io/instance": f"{strategy}-relay"},
                         "annotations": {"mailtls.io/strategy": strategy},
                         "ownerReferences": [owner] if owner else []},
            "spec": {"containers": [{"name": "postfix", "image": "postfix"}]},
            "status": {"phase": "Pending"}}  # not Ready: no exec into it


async def test_every_recorded_call_is_granted_and_every_grant_is_used(
        cluster: Cluster, apiserver: ApiServer, run_operator: Any, kube_client: Any) -> None:
    apiserver.seed("apps/v1/statefulsets", {
        "metadata": {"name": "restart-relay", "namespace": "mail", "uid": "sts-uid"},
        "spec": {"selector": {"matchLabels": {"app": "r"}}, "serviceName": "r",
                 "template": {"metadata": {"labels": {"app": "r"}},
                              "spec": {"containers": [{"name": "p", "image": "p"}]}}}})
    apiserver.seed("v1/pods", _pod("restart-0", "restart",
                                   {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                    "name": "restart-relay", "uid": "sts-uid"}))
    apiserver.seed("v1/pods", _pod("exec-0", "exec"))
    apiserver.reset_log()
    async with operating(run_operator, kube_client) as op:
        await cluster.apply(policy("p", destinations=["a.example"], level="encrypt",
                                   instances=[]))
        await cluster.apply(policy("named", destinations=["b.example"], level="may",
                                   instances=["lonely"]))
        await cluster.apply(policy("loser", destinations=["b.example"], level="none",
                                   instances=["lonely"]))  # a Conflict: a Warning Event
        await cluster.until(lambda: cluster.table("mail", "lonely") == [
            "a.example encrypt", "b.example may"])
        await cluster.until(lambda: (c := cluster.condition("mail", "loser", "Accepted"))
                            and c["reason"] == "Conflict")
        await cluster.until(lambda: cluster.table("mail", "restart-relay") == [
            "a.example encrypt"])
        await cluster.until(lambda: idle(op))
        await cluster.apply(policy("p", destinations=["a.example"], level="secure",
                                   match=["nexthop"], instances=[]))  # ConfigMaps patched
        await cluster.until(lambda: cluster.table("mail", "restart-relay") == [
            "a.example secure match=nexthop"])
        await cluster.delete("mail", "loser")
        await cluster.delete("mail", "named")  # its instance has no pods: ConfigMap deleted
        await cluster.until(lambda: cluster.configmap("mail", "lonely") is None)
        await cluster.until(lambda: idle(op))

    user = {("mailtls.io", "mailtlspolicies", v) for v in ("create", "patch", "delete")}
    recorded = {(r.group or "", r.resource + (f"/{r.subresource}" if r.subresource else ""),
                 r.verb) for r in apiserver.request_log} - user  # the test's own kubectl
    grants = {(g[1], g[2], g[3]) for g in operator_grants(chart_objects())}
    assert recorded - grants == set(), "calls the chart does not allow"
    unused = grants - recorded - set(NOT_RECORDABLE)
    assert unused == set(), "grants no code path uses"
