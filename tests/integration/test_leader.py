"""Leader election on a Lease: one replica acts, a standby takes over (DESIGN.md §8, issue 5)."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import kopf
import kubernetes.client
import pytest

from mailtls_operator.controller import Config, Operator, build_registry
from mailtls_operator.kube import Kube
from mailtls_operator.leader import LeaderElector
from testbed.apiserver import ApiServer
from tests.integration.helpers import Cluster, NoPodsRunner, policy

pytestmark = pytest.mark.integration


def elector(client: kubernetes.client.ApiClient, identity: str) -> LeaderElector:
    return LeaderElector(Kube(client), "mailtls-system", "mailtls-operator", identity,
                         lease_seconds=1.0, renew_every=0.25)


async def test_one_holder_at_a_time_and_takeover_after_the_lease_expires(
        apiserver: ApiServer, kube_client: kubernetes.client.ApiClient) -> None:
    a, b = elector(kube_client, "a"), elector(kube_client, "b")
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    assert await a.try_acquire_or_renew()  # renewing is fine
    lease = apiserver.get_object("coordination.k8s.io/v1/leases", "mailtls-system",
                                 "mailtls-operator")
    assert lease is not None and lease["spec"]["holderIdentity"] == "a"
    await asyncio.sleep(1.1)  # a stopped renewing: its lease runs out
    assert await b.try_acquire_or_renew()
    assert not await a.try_acquire_or_renew()
    lease = apiserver.get_object("coordination.k8s.io/v1/leases", "mailtls-system",
                                 "mailtls-operator")
    assert lease is not None
    assert (lease["spec"]["holderIdentity"], lease["spec"]["leaseTransitions"]) == ("b", 1)


async def test_a_released_lease_is_taken_at_once(apiserver: ApiServer,
                                                  kube_client: kubernetes.client.ApiClient
                                                  ) -> None:
    a, b = elector(kube_client, "a"), elector(kube_client, "b")
    changes: list[bool] = []
    task = asyncio.create_task(a.run(changes.append))
    await apiserver.wait_until(lambda: a.is_leader)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await a.release()
    assert await b.try_acquire_or_renew()
    assert changes == [True]


async def test_only_the_leader_writes_and_a_standby_takes_over(
        cluster: Cluster, apiserver: ApiServer, run_operator: Any,
        kube_client: kubernetes.client.ApiClient) -> None:
    def make(identity: str) -> Operator:
        return Operator(Kube(kube_client), NoPodsRunner(),
                        Config(debounce=0.1, max_delay=1.0),
                        leader=elector(kube_client, identity))

    first, second = make("first"), make("second")
    async with AsyncExitStack() as outer:
        stop_first = AsyncExitStack()
        await stop_first.enter_async_context(
            run_operator(build_registry(), memo=kopf.Memo(operator=first)))
        await apiserver.wait_until(lambda: first.may_act)
        await outer.enter_async_context(
            run_operator(build_registry(), memo=kopf.Memo(operator=second)))
        await cluster.apply(policy("p", destinations=["a.example"], level="may"))
        await cluster.until(lambda: cluster.table("mail", "relay") == ["a.example may"])
        assert not second.may_act
        assert second.states == {}  # the standby only watched
        await stop_first.aclose()  # the leader stops (and hands the lease over)
        await apiserver.wait_until(lambda: second.may_act, 5)
        await cluster.apply(policy("p", destinations=["a.example"], level="encrypt"))
        await cluster.until(lambda: cluster.table("mail", "relay") == ["a.example encrypt"])
        status = await cluster.until(lambda: (c := cluster.condition("mail", "p", "Ready"))
                                     and c["observedGeneration"] == 2 and c)
        assert status["status"] in ("True", "False")
