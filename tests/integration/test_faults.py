"""Reliability: API faults end in the correct table and truthful status (DESIGN.md §7, issue 6).

Faults are injected by the API server emulation *before* anything is stored, as a real
server fails: an injected 500 or 409 changes nothing, so only the operator's retries can
bring the world to the wanted state.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest

from mailtls_operator.controller import Config, Operator, build_registry
from mailtls_operator.kube import Kube
from testbed.apiserver import WRITE_VERBS, ApiServer
from tests.integration.helpers import Cluster, NoPodsRunner, idle, operating, policy

pytestmark = pytest.mark.integration


async def test_configmap_write_errors_are_retried_until_the_table_is_right(
        cluster: Cluster, apiserver: ApiServer, run_operator: Any, kube_client: Any) -> None:
    fault = apiserver.inject_fault(WRITE_VERBS, "configmaps", status=500, times=2)
    async with operating(run_operator, kube_client) as op:
        await cluster.apply(policy("p", destinations=["a.example"], level="encrypt"))
        await cluster.until(lambda: cluster.table("mail", "relay") == ["a.example encrypt"], 15)
        assert fault.exhausted
        await cluster.until(lambda: idle(op) and cluster.condition("mail", "p", "Ready"))


async def test_a_conflict_on_create_and_status_writes_still_converge(
        cluster: Cluster, apiserver: ApiServer, run_operator: Any, kube_client: Any) -> None:
    creates = apiserver.inject_fault("create", "configmaps", status=409, times=1)
    status = apiserver.inject_fault("patch", "mailtlspolicies", subresource="status",
                                    status=409, times=2)
    async with operating(run_operator, kube_client) as op:
        await cluster.apply(policy("p", destinations=["a.example"], level="may"))
        await cluster.until(lambda: cluster.table("mail", "relay") == ["a.example may"], 15)
        ready = await cluster.until(lambda: cluster.condition("mail", "p", "Ready"), 15)
        assert ready["reason"] == "RolledOut"
        assert creates.exhausted and status.exhausted
        await cluster.until(lambda: idle(op))


async def test_a_hanging_api_call_times_out_and_is_retried(
        cluster: Cluster, apiserver: ApiServer, run_operator: Any, kube_client: Any) -> None:
    hang = apiserver.inject_fault(WRITE_VERBS, "configmaps", status=504, delay=3.0, times=1)
    op = Operator(Kube(kube_client, timeout=0.5), NoPodsRunner(),
                  Config(debounce=0.1, max_delay=1.0, retry_base=0.2))
    async with run_operator(build_registry(), memo=kopf.Memo(operator=op)):
        await cluster.apply(policy("p", destinations=["a.example"], level="encrypt"))
        await cluster.until(lambda: cluster.table("mail", "relay") == ["a.example encrypt"], 15)
        assert hang.hits == 1


async def test_watches_that_expire_with_410_are_resumed_and_nothing_is_missed(
        cluster: Cluster, apiserver: ApiServer, run_operator: Any, kube_client: Any) -> None:
    async with operating(run_operator, kube_client) as op:
        await cluster.apply(policy("before", destinations=["a.example"], level="may"))
        await cluster.until(lambda: cluster.table("mail", "relay") == ["a.example may"])
        watches = apiserver.watch_count("mailtlspolicies")
        assert apiserver.expire_watches() > 0
        await cluster.until(lambda: apiserver.watch_count("mailtlspolicies") > watches, 15)
        await cluster.apply(policy("after", destinations=["b.example"], level="encrypt"))
        await cluster.delete("mail", "before")
        await cluster.until(lambda: cluster.table("mail", "relay") == ["b.example encrypt"], 15)
        await cluster.until(lambda: idle(op))


async def test_server_errors_on_lists_at_start_do_not_lose_the_world(
        cluster: Cluster, apiserver: ApiServer, run_operator: Any, kube_client: Any) -> None:
    for i in range(3):
        await cluster.apply(policy(f"p{i}", destinations=[f"d{i}.example"], level="encrypt"))
    apiserver.inject_fault("list", "mailtlspolicies", status=503, times=1)
    async with operating(run_operator, kube_client) as op:
        await cluster.until(lambda: len(cluster.table("mail", "relay") or []) == 3, 20)
        await cluster.until(lambda: idle(op))


async def test_deleting_every_policy_of_an_instance_with_pods_leaves_an_empty_valid_table(
        cluster: Cluster, apiserver: ApiServer, run_operator: Any, kube_client: Any) -> None:
    # a pod with the restart strategy: no exec, the ConfigMap is what it loads at start
    apiserver.seed("v1/pods", {
        "metadata": {"name": "relay-0", "namespace": "mail",
                     "labels": {"mailtls.io/instance": "relay"},
                     "annotations": {"mailtls.io/strategy": "restart"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                                          "name": "relay", "uid": "sts-uid"}]},
        "spec": {"containers": [{"name": "postfix", "image": "postfix"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})
    apiserver.seed("apps/v1/statefulsets", {
        "metadata": {"name": "relay", "namespace": "mail", "uid": "sts-uid"},
        "spec": {"selector": {"matchLabels": {"app": "relay"}}, "serviceName": "relay",
                 "template": {"metadata": {"labels": {"app": "relay"}},
                              "spec": {"containers": [{"name": "postfix",
                                                       "image": "postfix"}]}}}})
    async with operating(run_operator, kube_client) as op:
        await cluster.apply(policy("p", destinations=["a.example"], level="encrypt"))
        await cluster.until(lambda: cluster.table("mail", "relay") == ["a.example encrypt"])
        sts = await cluster.until(lambda: (s := apiserver.get_object(
            "apps/v1/statefulsets", "mail", "relay")) and
            s["spec"]["template"]["metadata"].get("annotations", {}).get("mailtls.io/revision")
            and s)
        revision = sts["spec"]["template"]["metadata"]["annotations"]["mailtls.io/revision"]
        cm = cluster.configmap("mail", "relay")
        assert cm is not None
        assert cm["metadata"]["annotations"]["mailtls.io/revision"] == revision
        await cluster.delete("mail", "p")
        await cluster.until(lambda: cluster.table("mail", "relay") == [])
        cm = cluster.configmap("mail", "relay")
        assert cm is not None  # the instance still has a pod: an empty table, not none
        text = cm["data"]["tls_policy"]
        assert "mailtls-revision.invalid secure match=rev-" in text
        await cluster.until(lambda: idle(op))
        await asyncio.sleep(0)
