"""MailTLSDiscovery through the whole operator: discovered lines in a real Postfix pod's table,
status per domain, the precedence rule against a static policy, an Event on a change."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import kubernetes.client
import pytest

from mailtls_operator.controller import Operator
from mailtls_operator.crd import GROUP, VERSION
from mailtls_operator.discovery.dns import Dns
from mailtls_operator.discovery.engine import Discoverer
from mailtls_operator.discovery.fetch import ssl_context
from testbed import LocalPodRunner
from testbed.auditlog import AuditTail
from testbed.stsworld import StsWorld

from .conftest import PodFactory
from .operating import Kubectl, make_operator, poll, seed_pods, started

pytestmark = [pytest.mark.postfix, pytest.mark.cluster]

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
async def operator(kubectl: Kubectl, runner: LocalPodRunner,
                   world: StsWorld) -> AsyncIterator[Operator]:
    """The operator with its discoverer asking the test's DNS and HTTPS servers."""
    op = make_operator(kubectl, runner)
    op.discovery.discoverer = Discoverer(Dns(("127.0.0.1", world.dns_port), timeout=2.0),
                                         ssl_context(world.ca_file), https_port=world.https_port)
    async with started(kubectl, op):
        yield op


def discovery(name: str, *domains: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MailTLSDiscovery",
            "metadata": {"name": name}, "spec": {"domains": list(domains)}}


async def test_discovered_lines_status_precedence_and_change_event(
        make_pod: PodFactory, runner: LocalPodRunner, kubectl: Kubectl, audit_tail: AuditTail,
        world: StsWorld) -> None:
    [(_, inst)] = await seed_pods(make_pod, kubectl, 1)
    async with operator(kubectl, runner, world) as op:
        op.config.observe_interval = 0.5
        await kubectl.apply("signed-static", destinations=["signed.example"], level="encrypt")
        await kubectl.apply_object(discovery("partners", "partner.example", "testing.example",
                                             "signed.example"), PLURAL)
        with pytest.raises(kubernetes.client.ApiException) as refused:  # the CRD's pattern
            await kubectl.apply_object(discovery("bad", "[mx.example]"), PLURAL)
        assert refused.value.status == 422

        def domains() -> dict[str, Any] | None:
            got = kubectl.status("partners", PLURAL)
            ds = {d["domain"]: d for d in got.get("domains", [])}
            signed = ds.get("signed.example", {})
            return ds if signed.get("overriddenBy") else None

        ds = await poll(domains, timeout=20)
        assert inst.query("partner.example") == \
            "secure match=.partner.example servername=hostname"
        assert inst.query("testing.example") is None      # testing: never written
        assert inst.query("signed.example") == "encrypt"  # static beats DANE
        partner = ds["partner.example"]
        assert (partner["source"], partner["mode"], partner["id"]) == ("mta-sts", "enforce", "1")
        assert partner["mx"] == ["*.partner.example"] and partner["expiresAt"]
        assert ds["testing.example"]["wouldEnforce"].startswith("secure match=")

        def probed() -> Any:  # testing: probed (posttls-finger in the pod), never written
            return [d.get("probe") for d in kubectl.status("partners", PLURAL).get("domains", [])
                    if d["domain"] == "testing.example" and d.get("probe")]
        [probe] = await poll(probed, timeout=20)
        assert (probe["result"], probe["reason"]) == ("Fail", "Unreachable"), probe  # no DNS here
        assert probe["destination"] == "testing.example"
        assert ds["signed.example"]["source"] == "dane"
        assert ds["signed.example"]["overriddenBy"] == [f"{kubectl.ns}/signed-static"]
        status = kubectl.status("partners", PLURAL)
        assert status["conditions"][0]["reason"] == "Discovered"
        assert (status["enforced"], status["testing"]) == (2, 1)

        # the partner moves to new MX hosts under a new id; a spec change starts a round now
        world.publish_sts("partner.example", id="2", mx=["*.mx.partner.example"])
        await asyncio.to_thread(
            kubectl.custom.patch_namespaced_custom_object, GROUP, VERSION, kubectl.ns, PLURAL,
            "partners", {"spec": {"domains": ["partner.example", "testing.example"]}})

        def changed() -> Any:
            return inst.query("partner.example") == \
                "secure match=.mx.partner.example servername=hostname"
        await poll(changed, timeout=20)
        messages = [e["message"] for e in kubectl.events() if e.get("reason") == "PolicyChanged"]
        assert any("partner.example: id 1 -> 2" in m for m in messages), messages
        metric = op.ctx.metrics.registry.get_sample_value(
            "mailtls_discovered_policy_changes_total",
            {"namespace": kubectl.ns, "discovery": "partners", "field": "id"})
        assert metric == 1.0
        assert inst.query("signed.example") == "encrypt"  # the static policy stays
    # the calls the chart grants for this kind (tests/contract and test_rbac_real.py check them)
    for verb, sub in (("list", ""), ("watch", ""), ("patch", "status")):
        assert kubectl.count(audit_tail, verb, PLURAL, subresource=sub) > 0, verb


async def test_discovered_servername_held_back_from_old_postfix(
        make_pod: PodFactory, runner: LocalPodRunner, kubectl: Kubectl, world: StsWorld) -> None:
    """The resolvers' classic trap: servername=hostname to a Postfix older than 3.4."""
    [(_, inst)] = await seed_pods(make_pod, kubectl, 1, extra_main_cf={"mail_version": "3.3.0"})
    async with operator(kubectl, runner, world):
        await kubectl.apply_object(discovery("partners", "partner.example", "signed.example"),
                                   PLURAL)

        def warned() -> Any:
            got = kubectl.status("partners", PLURAL)
            ds = {d["domain"]: d for d in got.get("domains", [])}
            return ds if all(d.get("warnings") for d in ds.values()) and len(ds) == 2 else None
        ds = await poll(warned, timeout=20)
        [held] = ds["partner.example"]["warnings"]
        assert held["reason"] == "UnsupportedAttribute"
        assert "servername needs Postfix 3.4" in held["message"]
        # the DANE line rolls out, and its own lint says what this instance does with it
        assert [w["reason"] for w in ds["signed.example"]["warnings"]] == ["DNSSECDisabled"]
        await poll(lambda: inst.query("signed.example") == "dane-only", 20)
        assert inst.query("partner.example") is None  # held back; the DANE line rolled out
