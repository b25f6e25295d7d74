"""MailTLSDiscovery through the whole operator: discovered lines in a real Postfix pod's table,
status per domain, the precedence rule against a static policy, an Event on a change."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import kopf
import kubernetes.client
import pytest
import yaml

from mailtls_operator.controller import Config, Operator, build_registry
from mailtls_operator.crd import GROUP, VERSION
from mailtls_operator.discovery.dns import Dns
from mailtls_operator.discovery.engine import Discoverer
from mailtls_operator.discovery.fetch import ssl_context
from mailtls_operator.discovery.objects import DiscoveryInvalid, crd_path, load_discovery
from mailtls_operator.kube import Kube
from testbed import LocalPodRunner
from testbed.apiserver import ApiServer, FieldCause, ResourceSpec
from testbed.stsworld import StsWorld

from .conftest import PodFactory
from .test_through_operator import Kubectl, kubectl, seed_pods

__all__ = ["kubectl"]  # the fixture, re-used

pytestmark = [pytest.mark.postfix, pytest.mark.integration]

PLURAL = "mailtlsdiscoveries"


@pytest.fixture
def world() -> Iterator[StsWorld]:
    with StsWorld(["mta-sts.partner.example", "mta-sts.testing.example",
                   "mta-sts.signed.example"]) as w:
        w.publish_sts("partner.example", id="1", mx=["*.partner.example"])
        w.publish_sts("testing.example", id="1", mode="testing")
        w.publish_sts("signed.example", id="1")
        w.publish_mx("signed.example", "mx.signed.example", tlsa=True, signed=True)
        yield w


@asynccontextmanager
async def operator(run_operator: Any, kube_client: Any, runner: LocalPodRunner,
                   world: StsWorld) -> AsyncIterator[Operator]:
    op = Operator(Kube(kube_client), runner,
                  Config(debounce=0.1, max_delay=1.0, retry_base=0.3, probe_enforced=False))
    op.discovery.discoverer = Discoverer(Dns(("127.0.0.1", world.dns_port), timeout=2.0),
                                         ssl_context(world.ca_file), https_port=world.https_port)
    async with run_operator(build_registry(), memo=kopf.Memo(operator=op)):
        yield op


def _declare(apiserver: ApiServer) -> None:
    """Serve the kind as its CRD declares it: schema (pruning, defaults) and validation by
    the operator's own loader, refusals as 422 causes."""
    crd = yaml.safe_load(crd_path().read_text(encoding="utf-8"))
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    def validate(obj: Any) -> list[FieldCause]:
        try:
            load_discovery(obj)
        except DiscoveryInvalid as exc:
            return [FieldCause("spec", "FieldValueInvalid", str(exc))]
        return []

    apiserver.declare(ResourceSpec(GROUP, VERSION, PLURAL, "MailTLSDiscovery", namespaced=True,
                                   subresources=frozenset({"status"}), generation=True,
                                   return_deleted=True, schema=schema, validate=validate,
                                   custom=True, shortnames=frozenset({"mtd"})))


async def test_discovered_lines_status_precedence_and_change_event(
        make_pod: PodFactory, runner: LocalPodRunner, apiserver: ApiServer, kubectl: Kubectl,
        run_operator: Any, kube_client: Any, world: StsWorld) -> None:
    _declare(apiserver)
    [(_, inst)] = seed_pods(make_pod, apiserver, 1)
    obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MailTLSDiscovery",
           "metadata": {"name": "partners", "namespace": "mail"},
           "spec": {"domains": ["partner.example", "testing.example", "signed.example"]}}
    async with operator(run_operator, kube_client, runner, world) as op:
        op.config.observe_interval = 0.5
        await kubectl.apply("signed-static", destinations=["signed.example"], level="encrypt")
        custom = kubernetes.client.CustomObjectsApi(kube_client)
        await asyncio.to_thread(custom.create_namespaced_custom_object, GROUP, VERSION, "mail",
                                PLURAL, obj)
        bad = {**obj, "metadata": {"name": "bad", "namespace": "mail"},
               "spec": {"domains": ["[mx.example]"]}}
        with pytest.raises(kubernetes.client.ApiException) as refused:
            await asyncio.to_thread(custom.create_namespaced_custom_object, GROUP, VERSION,
                                    "mail", PLURAL, bad)
        assert refused.value.status == 422

        def domains() -> dict[str, Any] | None:
            got = apiserver.get_object(PLURAL, "mail", "partners") or {}
            ds = {d["domain"]: d for d in (got.get("status") or {}).get("domains", [])}
            signed = ds.get("signed.example", {})
            return ds if signed.get("overriddenBy") else None

        ds = await apiserver.wait_until(domains, timeout=20)
        assert inst.query("partner.example") == \
            "secure match=.partner.example servername=hostname"
        assert inst.query("testing.example") is None      # testing: never written
        assert inst.query("signed.example") == "encrypt"  # static beats DANE
        partner = ds["partner.example"]
        assert (partner["source"], partner["mode"], partner["id"]) == ("mta-sts", "enforce", "1")
        assert partner["mx"] == ["*.partner.example"] and partner["expiresAt"]
        assert ds["testing.example"]["wouldEnforce"].startswith("secure match=")

        def probed() -> Any:  # testing: probed (posttls-finger in the pod), never written
            got = apiserver.get_object(PLURAL, "mail", "partners") or {}
            return [d.get("probe") for d in (got.get("status") or {}).get("domains", [])
                    if d["domain"] == "testing.example" and d.get("probe")]
        [probe] = await apiserver.wait_until(probed, timeout=20)
        assert (probe["result"], probe["reason"]) == ("Fail", "Unreachable"), probe  # no DNS here
        assert probe["destination"] == "testing.example"
        assert ds["signed.example"]["source"] == "dane"
        assert ds["signed.example"]["overriddenBy"] == ["mail/signed-static"]
        status = (apiserver.get_object(PLURAL, "mail", "partners") or {})["status"]
        assert status["conditions"][0]["reason"] == "Discovered"
        assert (status["enforced"], status["testing"]) == (2, 1)

        # the partner moves to new MX hosts under a new id; a spec change starts a round now
        world.publish_sts("partner.example", id="2", mx=["*.mx.partner.example"])
        await asyncio.to_thread(
            custom.patch_namespaced_custom_object, GROUP, VERSION, "mail", PLURAL, "partners",
            {"spec": {"domains": ["partner.example", "testing.example"]}})

        def changed() -> Any:
            return inst.query("partner.example") == \
                "secure match=.mx.partner.example servername=hostname"
        await apiserver.wait_until(changed, timeout=20)
        events = apiserver.list_objects("v1/events", "mail")
        messages = [e["message"] for e in events if e.get("reason") == "PolicyChanged"]
        assert any("partner.example: id 1 -> 2" in m for m in messages), messages
        metric = op.ctx.metrics.registry.get_sample_value(
            "mailtls_discovered_policy_changes_total",
            {"namespace": "mail", "discovery": "partners", "field": "id"})
        assert metric == 1.0
        assert inst.query("signed.example") == "encrypt"  # the static policy stays
    # the calls the chart grants for this kind (tests/integration/test_rbac.py names them)
    for verb, sub in (("list", None), ("watch", None), ("patch", "status")):
        assert apiserver.request_count(verb, PLURAL, subresource=sub) > 0, verb


async def test_discovered_servername_held_back_from_old_postfix(
        make_pod: PodFactory, runner: LocalPodRunner, apiserver: ApiServer,
        run_operator: Any, kube_client: Any, world: StsWorld) -> None:
    """The resolvers' classic trap: servername=hostname to a Postfix older than 3.4."""
    _declare(apiserver)
    [(_, inst)] = seed_pods(make_pod, apiserver, 1, extra_main_cf={"mail_version": "3.3.0"})
    obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MailTLSDiscovery",
           "metadata": {"name": "partners", "namespace": "mail"},
           "spec": {"domains": ["partner.example", "signed.example"]}}
    async with operator(run_operator, kube_client, runner, world):
        custom = kubernetes.client.CustomObjectsApi(kube_client)
        await asyncio.to_thread(custom.create_namespaced_custom_object, GROUP, VERSION, "mail",
                                PLURAL, obj)

        def warned() -> Any:
            got = apiserver.get_object(PLURAL, "mail", "partners") or {}
            ds = {d["domain"]: d for d in (got.get("status") or {}).get("domains", [])}
            return ds if all(d.get("warnings") for d in ds.values()) and len(ds) == 2 else None
        ds = await apiserver.wait_until(warned, timeout=20)
        [held] = ds["partner.example"]["warnings"]
        assert held["reason"] == "UnsupportedAttribute"
        assert "servername needs Postfix 3.4" in held["message"]
        # the DANE line rolls out, and its own lint says what this instance does with it
        assert [w["reason"] for w in ds["signed.example"]["warnings"]] == ["DNSSECDisabled"]
        await apiserver.wait_until(lambda: inst.query("signed.example") == "dane-only", 20)
        assert inst.query("partner.example") is None  # held back; the DANE line rolled out
