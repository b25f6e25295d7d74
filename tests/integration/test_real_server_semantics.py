"""Where a real API server is stricter than a JSON store, the emulation is too, and the
operator copes: RE2 patterns, list sets, validated ``/status``, 415 on strategic merge
patch, one refused status write that stops nobody else, and no exec with ``restart``.

The remaining differences are listed in ``KNOWN_DIFFERENCES.md`` beside the emulation.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import kubernetes.client
import pytest
from kubernetes.client import ApiException

from mailtls_operator.execrunner import KubernetesExecRunner
from mailtls_operator.podrunner import ExecResult, PodRef
from mailtls_operator.world import ANN_TEMPLATE_REVISION as TEMPLATE_REVISION
from testbed.apiserver import ApiServer
from tests.contract.kit import chart_objects, operator_grants
from tests.integration.helpers import (
    GROUP,
    PLURAL,
    VERSION,
    Cluster,
    idle,
    make_operator,
    operating,
    policy,
)

pytestmark = pytest.mark.integration


def _refusal(exc: ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(exc.body or "{}")
    return body


async def test_a_trailing_newline_is_refused_as_a_real_api_server_refuses_it(
        cluster: Cluster) -> None:
    """Go's RE2 has no ``$`` before a final newline; Python's re.search had."""
    specs: list[dict[str, Any]] = [{"destinations": ["example.com\n"], "level": "encrypt"},
                 {"destinations": ["example.com"], "level": "secure",
                  "match": ["nexthop\n", "dot-nexthop"]},
                 {"destinations": ["example.com"], "level": "encrypt",
                  "exclude": ["3DES\nexample.net none"]}]
    for spec in specs:
        with pytest.raises(ApiException) as refused:
            await cluster.apply(policy("hostile", **spec))
        assert refused.value.status == 422
        body = _refusal(refused.value)
        assert body["reason"] == "Invalid"
        fields = [c["field"] for c in body["details"]["causes"]]
        assert len(fields) == 1 and fields[0].startswith(
            ("spec.destinations[0]", "spec.match[0]", "spec.exclude[0]")), body
        assert "must match" in body["details"]["causes"][0]["message"]
    assert cluster.server.get_object(PLURAL, "mail", "hostile") is None


async def test_duplicate_items_of_a_set_list_are_refused_with_422_duplicate_value(
        cluster: Cluster) -> None:
    with pytest.raises(ApiException) as refused:
        await cluster.apply(policy("dup", destinations=["a.example", "b.example", "a.example"],
                                   level="encrypt"))
    body = _refusal(refused.value)
    assert refused.value.status == 422
    assert body["details"]["causes"] == [{"reason": "FieldValueDuplicate",
                                          "message": 'Duplicate value: "a.example"',
                                          "field": "spec.destinations[2]"}]


async def test_strategic_merge_patch_on_a_custom_resource_answers_415(
        cluster: Cluster) -> None:
    await cluster.apply(policy("p", destinations=["a.example"], level="encrypt"))
    with pytest.raises(ApiException) as refused:
        await asyncio.to_thread(
            cluster.custom.patch_namespaced_custom_object, GROUP, VERSION, "mail", PLURAL, "p",
            {"spec": {"level": "may"}},
            _content_type="application/strategic-merge-patch+json")
    assert refused.value.status == 415
    assert "application/merge-patch+json" in _refusal(refused.value)["message"]
    pod: Any = {"metadata": {"name": "x", "namespace": "mail"},  # the client takes dicts
           "spec": {"containers": [{"name": "c", "image": "i"}]}}
    await asyncio.to_thread(cluster.core.create_namespaced_pod, "mail", pod)
    await asyncio.to_thread(  # built-in kinds keep strategic merge patch
        cluster.core.patch_namespaced_pod, "x", "mail", {"metadata": {"labels": {"a": "b"}}},
        _content_type="application/strategic-merge-patch+json")


async def test_an_invalid_status_write_is_refused_with_the_real_error_shape_and_pruned(
        cluster: Cluster) -> None:
    await cluster.apply(policy("p", destinations=["a.example"], level="encrypt"))
    bad = {"status": {"conditions": [
        {"type": "Ready", "status": "Maybe", "reason": "X", "message": "m"},
        {"type": "Ready", "status": "True", "reason": "Y", "message": "m"}]}}
    with pytest.raises(ApiException) as refused:
        await asyncio.to_thread(cluster.custom.patch_namespaced_custom_object_status, GROUP,
                                VERSION, "mail", PLURAL, "p", bad,
                                _content_type="application/merge-patch+json")
    body = _refusal(refused.value)
    assert (refused.value.status, body["kind"], body["status"], body["reason"], body["code"]) \
        == (422, "Status", "Failure", "Invalid", 422)
    assert body["details"]["name"] == "p" and body["details"]["kind"] == "MailTLSPolicy"
    causes = {(c["field"], c["reason"]) for c in body["details"]["causes"]}
    assert causes == {("status.conditions[0].status", "FieldValueNotSupported"),
                      ("status.conditions[1]", "FieldValueDuplicate")}
    assert body["message"].startswith('MailTLSPolicy.mailtls.io "p" is invalid: [')
    assert cluster.status("mail", "p") == {}  # nothing stored

    extra = {"status": {"conditions": [{"type": "Ready", "status": "True", "bogus": 1}]}}
    await asyncio.to_thread(cluster.custom.patch_namespaced_custom_object_status, GROUP,
                            VERSION, "mail", PLURAL, "p", extra,
                            _content_type="application/merge-patch+json")
    assert cluster.status("mail", "p")["conditions"] == [{"type": "Ready", "status": "True"}]


async def test_one_refused_status_write_never_stops_the_others_and_is_retried(
        cluster: Cluster, apiserver: ApiServer, run_operator: Any, kube_client: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    fault = apiserver.inject_fault("patch", PLURAL, subresource="status", name="p2",
                                   status=422, times=2, message="status.conditions: Invalid")
    caplog.set_level(logging.WARNING, logger="mailtls.controller")
    async with operating(run_operator, kube_client, retry_base=0.1):
        for i in range(5):
            await cluster.apply(policy(f"p{i}", destinations=[f"d{i}.example"],
                                       level="encrypt"))
        others = [f"p{i}" for i in range(5) if i != 2]
        await cluster.until(lambda: all(cluster.condition("mail", n, "Ready")
                                        for n in others))
        await cluster.until(lambda: fault.exhausted)
        await cluster.until(lambda: cluster.condition("mail", "p2", "Ready"))  # retried
    assert any("status of mail/p2 not written (HTTP 422" in r.getMessage()
               for r in caplog.records)


def _ready_pod(name: str, instance: str, strategy: str, owner: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "mail",
                         "labels": {"mailtls.io/instance": instance},
                         "annotations": {"mailtls.io/strategy": strategy},
                         "ownerReferences": [owner]},
            "spec": {"containers": [{"name": "postfix", "image": "postfix"}]},
            "status": {"phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True"}]}}


async def test_restart_strategy_makes_no_exec_request_with_the_charts_restart_rbac(
        cluster: Cluster, apiserver: ApiServer, run_operator: Any,
        kube_client: kubernetes.client.ApiClient) -> None:
    apiserver.seed("apps/v1/statefulsets", {
        "metadata": {"name": "relay", "namespace": "mail", "uid": "sts-uid"},
        "spec": {"selector": {"matchLabels": {"app": "r"}}, "serviceName": "r",
                 "template": {"metadata": {"labels": {"app": "r"}},
                              "spec": {"containers": [{"name": "p", "image": "p"}]}}}})
    owner = {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "relay", "uid": "sts-uid"}
    for i in range(2):
        apiserver.seed("v1/pods", _ready_pod(f"relay-{i}", "relay", "restart", owner))
    apiserver.reset_log()
    op = make_operator(kube_client, default_strategy="restart")
    op.runner = KubernetesExecRunner(kube_client)  # production's runner: exec would be logged
    from kopf import Memo

    from mailtls_operator.controller import build_registry
    async with run_operator(build_registry(), memo=Memo(operator=op)):
        await cluster.apply(policy("anchored", destinations=["a.example"], level="secure",
                                   match=["nexthop"], tafile=["/etc/postfix/tls/ca.pem"]))
        line = "a.example secure match=nexthop tafile=/etc/postfix/tls/ca.pem"
        await cluster.until(lambda: cluster.table("mail", "relay") == [line])
        revision = await cluster.until(lambda: (
            (apiserver.get_object("apps/v1/statefulsets", "mail", "relay") or {})["spec"]
            ["template"].get("metadata", {}).get("annotations", {}).get(TEMPLATE_REVISION)))
        for i in range(2):  # the StatefulSet controller's rolling update, played by hand
            await asyncio.to_thread(
                cluster.core.patch_namespaced_pod, f"relay-{i}", "mail",
                {"metadata": {"annotations": {TEMPLATE_REVISION: revision}}})
        ready = await cluster.until(lambda: (c := cluster.condition("mail", "anchored", "Ready"))
                                    and c["reason"] == "RolledOut" and c)
        await cluster.until(lambda: idle(op))
    assert "not checked in relay: the restart strategy does not exec" in ready["message"]
    execs = [r for r in apiserver.request_log if r.subresource in ("exec", "attach")]
    assert execs == []
    grants = {(g[1], g[2], g[3]) for g in operator_grants(chart_objects({"strategy": "restart"}))}
    assert not {g for g in grants if g[1] == "pods/exec"}
    user = {(GROUP, PLURAL, v) for v in ("create", "patch")} | {("", "pods", "patch")}
    recorded = {(r.group or "", r.resource + (f"/{r.subresource}" if r.subresource else ""),
                 r.verb) for r in apiserver.request_log} - user
    assert recorded - grants == set(), "calls the restart chart does not allow"


class ForbiddenRunner:
    """An exec strategy whose exec the API server refuses (RBAC without pods/exec)."""

    def __init__(self) -> None:
        self.calls = 0

    async def run(self, pod: PodRef, argv: Any, *, stdin: bytes | None = None,
                  timeout: float = 60.0) -> ExecResult:
        self.calls += 1
        raise ApiException(status=403, reason="Forbidden")


async def test_an_exec_refusal_is_never_read_as_tafile_present(
        cluster: Cluster, apiserver: ApiServer, run_operator: Any,
        kube_client: kubernetes.client.ApiClient) -> None:
    owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "rs-uid"}
    apiserver.seed("v1/pods", _ready_pod("relay-0", "relay", "exec", owner))
    runner = ForbiddenRunner()
    op = make_operator(kube_client)
    op.runner = runner
    from kopf import Memo

    from mailtls_operator.controller import build_registry
    async with run_operator(build_registry(), memo=Memo(operator=op)):
        await cluster.apply(policy("anchored", destinations=["a.example"], level="secure",
                                   match=["nexthop"], tafile=["/etc/postfix/tls/ca.pem"]))
        await cluster.apply(policy("plain", destinations=["b.example"], level="encrypt"))
        ready = await cluster.until(lambda: (c := cluster.condition("mail", "anchored", "Ready"))
                                    and c["reason"] == "CheckUnavailable" and c)
        await cluster.until(lambda: cluster.table("mail", "relay") == ["b.example encrypt"])
    assert "could not check tafile /etc/postfix/tls/ca.pem in pod relay-0" in ready["message"]
    assert "held back" in ready["message"]
    assert runner.calls >= 1
