"""The agent strategy end to end: the real kube-apiserver, real local Postfix pods, real mail.

The operator gets a PodRunner that fails on any call and the server's audit log must show
no exec: every table change, probe, lint fact and release of stuck mail goes through the
agents (DESIGN.md §11), which run the same argv as the exec strategy against the pod's
own Postfix (here: the local instance, through the agent's ProcessRunner), and talk to
the API server with their pods' own tokens.  API outages are made by a proxy in front of
the server (:mod:`testbed.faultproxy`) that only the agent talks to.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailtls_operator.agent.desired import AGENT_DATA
from mailtls_operator.configmap import configmap_bodies
from mailtls_operator.podrunner import ExecResult, PodRef
from mailtls_operator.policy import load_policy
from mailtls_operator.render import REVISION_KEY, Tables, render
from testbed import LocalInstance, SmtpSink
from testbed.auditlog import AuditTail
from testbed.controlplane import ControlPlane
from testbed.faultproxy import FaultProxy

from .agent_helpers import (
    AGENT_SA,
    grant_agents,
    make_agent,
    pod_token,
    publish,
    report,
    running,
    small_configmap_limits,
)
from .conftest import BOTH_VERSIONS, PodFactory
from .operating import INSTANCE, Kubectl, operator, poll, seed_pods

pytestmark = [pytest.mark.postfix, pytest.mark.cluster]


class NoPodsRunner:
    """The agent strategy needs no exec: any pod command is a bug in the operator."""

    def __init__(self) -> None:
        self.calls: list[tuple[PodRef, Any]] = []

    async def run(self, pod: PodRef, argv: Any, *, stdin: bytes | None = None,
                  timeout: float = 60.0) -> ExecResult:
        self.calls.append((pod, argv))
        raise AssertionError(f"unexpected pod command {argv} in {pod}")


@pytest.fixture
def agent_user(kubectl: Kubectl) -> str:
    """The agents' ServiceAccount and Role in the test's namespace; its audit user name."""
    return grant_agents(kubectl)


@pytest.fixture
def proxy(controlplane: ControlPlane) -> Iterator[FaultProxy]:
    """A proxy in front of the API server that can fail, hang and cut streams."""
    with FaultProxy(controlplane) as p:
        yield p


async def seed_agent_pods(make_pod: PodFactory, kubectl: Kubectl, count: int,
                          **settings: Any) -> list[tuple[str, LocalInstance]]:
    pods = await seed_pods(make_pod, kubectl, count, agent=AGENT_SA, **settings)
    return [(pod.name, inst) for pod, inst in pods]


async def test_a_change_is_live_in_every_pod_without_exec_and_stuck_mail_is_released(
        make_pod: PodFactory, plain: SmtpSink, kubectl: Kubectl, agent_user: str,
        audit_tail: AuditTail) -> None:
    routes = {"plain.example": f"smtp:{plain.nexthop}"}
    pods = await seed_agent_pods(make_pod, kubectl, 3, routes=routes)
    no_exec = NoPodsRunner()
    agents = [make_agent(kubectl, name, inst) for name, inst in pods]
    masters = [inst.master_pid() for _, inst in pods]
    async with running(agents), operator(kubectl, no_exec, observe_interval=0.3):
        await kubectl.apply("plain-partner", destinations=[plain.nexthop], level="encrypt")
        ready = await kubectl.until_ready("plain-partner", timeout=30)
        assert "relay: 3/3 pods verified" in ready["message"]
        revision = kubectl.status("plain-partner")["instances"][0]["revision"]
        for name, inst in pods:
            assert inst.query(plain.nexthop) == "encrypt"
            assert inst.query(REVISION_KEY) == f"secure match=rev-{revision[:16]}"
            obj = kubectl.pod(name) or {}
            assert obj["metadata"]["annotations"]["mailtls.io/applied-revision"] == revision

        relay0 = pods[0][1]
        qid = relay0.submit(["user@plain.example"])
        deferred = await asyncio.to_thread(relay0.wait_for_delivery, qid, status="deferred")
        assert "TLS is required, but was not offered" in deferred.reason

        def stuck() -> dict[str, Any] | None:
            d = kubectl.status("plain-partner").get("deferred") or {}
            return d if d.get("recipients") else None
        seen = await poll(stuck, 15)
        assert seen["keys"][0]["key"] == plain.nexthop

        await kubectl.apply("plain-partner", destinations=[plain.nexthop], level="may")
        await poll(lambda: plain.messages, timeout=20)  # released by the agent, no flush
        assert list(plain.messages[0].rcpt_tos) == ["user@plain.example"]
        await kubectl.until_ready("plain-partner", timeout=20)
        assert all(inst.query(plain.nexthop) == "may" for _, inst in pods)
        released = report(kubectl, "relay-0")
        assert released is not None and released.released >= 1
    assert no_exec.calls == []
    assert kubectl.exec_requests(audit_tail) == 0
    assert [inst.master_pid() for _, inst in pods] == masters  # Postfix never restarted
    # the agents, with their pods' tokens, patched their pods' mailtls.io annotations
    assert kubectl.count(audit_tail, "patch", "pods", user=agent_user) >= 3


async def test_probes_and_lint_come_from_the_agents(
        make_pod: PodFactory, plain: SmtpSink, self_signed: SmtpSink, ca_signed: SmtpSink,
        ca: Any, kubectl: Kubectl, agent_user: str, audit_tail: AuditTail) -> None:
    [(name, inst)] = await seed_agent_pods(make_pod, kubectl, 1)
    no_exec = NoPodsRunner()
    async with running([make_agent(kubectl, name, inst)]), operator(
            kubectl, no_exec, observe_interval=0.3):
        await kubectl.apply("plain", destinations=[plain.nexthop], level="encrypt",
                            mode="audit")
        await kubectl.apply("ca", destinations=[ca_signed.nexthop], level="secure",
                            match=["sink.mailtls.test"], tafile=[str(ca.pem_path)],
                            mode="audit")
        await kubectl.apply("self-signed", destinations=[self_signed.nexthop], level="secure",
                            match=["sink.mailtls.test"], mode="audit")
        await kubectl.apply("wrong-name", destinations=[ca_signed.nexthop], level="secure",
                            match=["other.mailtls.test"], tafile=[str(ca.pem_path)],
                            mode="audit")
        await kubectl.apply("dane", destinations=["dane.example"], level="dane")
        await kubectl.apply("missing-ca", destinations=["partner.example"], level="secure",
                            match=["nexthop"], tafile=["/nonexistent/partner-ca.pem"])

        assert (await kubectl.first_probe("plain"))["reason"] == "NoStartTLS"
        assert (await kubectl.first_probe("self-signed"))["reason"] == "Untrusted"
        assert (await kubectl.first_probe("wrong-name"))["reason"] == "NameMismatch"
        passed = await kubectl.first_probe("ca")
        assert (passed["result"], passed["reason"], passed["instance"]) == (
            "Pass", "Verified", "relay")
        dane = await kubectl.until_ready("dane", reason="DNSSECDisabled", timeout=20)
        assert "smtp_dns_support_level" in dane["message"]
        held = await kubectl.until_ready("missing-ca", reason="TrustAnchorMissing", timeout=20)
        assert "/nonexistent/partner-ca.pem" in held["message"]
        await poll(lambda: inst.query("dane.example") == "dane")
        await poll(lambda: inst.query("partner.example") is None)
        cm = kubectl.configmap() or {}
        assert plain.nexthop in cm["data"][AGENT_DATA]  # audit: probed, never in the table
        assert plain.nexthop not in cm["data"]["tls_policy"]
    assert no_exec.calls == [] and kubectl.exec_requests(audit_tail) == 0


async def test_a_pod_whose_agent_fails_makes_the_rollout_fail_and_recovers(
        make_pod: PodFactory, kubectl: Kubectl, agent_user: str, audit_tail: AuditTail) -> None:
    pods = await seed_agent_pods(make_pod, kubectl, 2)
    async with running([make_agent(kubectl, n, i) for n, i in pods]), operator(
            kubectl, NoPodsRunner(), retry_base=0.3):
        await kubectl.apply("p", destinations=["a.example"], level="may")
        await kubectl.until_ready("p", timeout=20)
        pods[0][1].lock_map_dir()  # relay-0 cannot write its table directory
        try:
            await kubectl.apply("p", destinations=["a.example"], level="encrypt")
            failed = await kubectl.until_ready("p", reason="RolloutFailed", timeout=20)
            assert f"{kubectl.ns}/relay-0: agent:" in failed["message"]
            assert pods[0][1].query("a.example") == "may"  # the last good table serves
            await poll(lambda: pods[1][1].query("a.example") == "encrypt")
        finally:
            pods[0][1].unlock_map_dir()
        await kubectl.until_ready("p", timeout=20)  # the agent retried by itself
        assert pods[0][1].query("a.example") == "encrypt"
    assert kubectl.exec_requests(audit_tail) == 0


# -- without the operator: ConfigMaps written straight into the API server --------------


def tables_for(namespace: str, *specs: tuple[str, str]) -> Tables:
    now = datetime.now(UTC)
    policies = [load_policy({"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy",
                             "metadata": {"name": f"p{i}", "namespace": namespace,
                                          "creationTimestamp": "2026-01-01T00:00:00Z"},
                             "spec": {"destinations": [dest], "level": level}}, now=now)
                for i, (dest, level) in enumerate(specs)]
    return render(policies, instance=(namespace, INSTANCE), now=now)


def applied(kubectl: Kubectl, pod: str, tables: Tables) -> bool:
    r = report(kubectl, pod)
    return r is not None and r.applied == tables.revision and not r.api_error


@pytest.mark.parametrize("outage", ["errors", "silence"])
async def test_an_api_outage_keeps_the_table_and_the_agent_catches_up(
        make_pod: PodFactory, kubectl: Kubectl, agent_user: str, proxy: FaultProxy,
        outage: str) -> None:
    [(name, inst)] = await seed_agent_pods(make_pod, kubectl, 1)
    first = tables_for(kubectl.ns, ("a.example", "encrypt"))
    publish(kubectl, first)
    agent = make_agent(kubectl, name, inst, url=proxy.url)
    async with running([agent]):
        await poll(lambda: inst.query("a.example") == "encrypt")
        await poll(lambda: applied(kubectl, name, first), 10)
        if outage == "errors":
            proxy.fail(503)
        else:  # the API stops answering at all: every request hangs past the agent's timeout
            proxy.hang()
        assert proxy.cut() >= 1  # the agent's watch breaks off
        await poll(lambda: not agent.api_ok)
        second = tables_for(kubectl.ns, ("a.example", "may"))
        publish(kubectl, second)  # written while the agent cannot read it
        await asyncio.sleep(0.5)
        assert inst.query("a.example") == "encrypt"  # the last good table keeps serving
        assert inst.query(REVISION_KEY) == first.revision_value()
        proxy.clear()
        await poll(lambda: inst.query("a.example") == "may", timeout=10)
        await poll(lambda: applied(kubectl, name, second), 10)


async def test_a_pod_starting_during_an_outage_loads_the_mounted_configmap(
        make_pod: PodFactory, kubectl: Kubectl, agent_user: str, proxy: FaultProxy) -> None:
    [(name, inst)] = await seed_agent_pods(make_pod, kubectl, 1)
    tables = tables_for(kubectl.ns, ("b.example", "encrypt"))
    publish(kubectl, tables)
    inst.publish_configmap(tables.tls_policy, tables.transport or None)  # the kubelet's copy
    proxy.fail(503)
    agent = make_agent(kubectl, name, inst, url=proxy.url)
    async with running([agent]):
        await poll(lambda: inst.query("b.example") == "encrypt", timeout=10)
        assert agent.converger.report.source == "volume"
        assert agent.converger.report.api_error
        proxy.clear()
        await poll(lambda: applied(kubectl, name, tables), 10)


async def test_a_malformed_configmap_keeps_the_last_good_table_and_is_reported(
        make_pod: PodFactory, kubectl: Kubectl, agent_user: str) -> None:
    [(name, inst)] = await seed_agent_pods(make_pod, kubectl, 1)
    good = tables_for(kubectl.ns, ("c.example", "encrypt"))
    publish(kubectl, good)
    async with running([make_agent(kubectl, name, inst)]):
        await poll(lambda: inst.query("c.example") == "encrypt")
        bad = configmap_bodies(kubectl.ns, INSTANCE,
                               tables_for(kubectl.ns, ("c.example", "may")))[0]
        bad["data"]["tls_policy"] = bad["data"]["tls_policy"].replace(" may", " none")
        kubectl.put_configmap(bad)  # edited by hand: its sha256 no longer matches

        def refused() -> Any:
            r = report(kubectl, name)
            return r if r is not None and "sha256" in r.error else None
        seen = await poll(refused, 10)
        assert seen.applied == good.revision
        assert inst.query("c.example") == "encrypt"


def many(namespace: str, count: int, level: str) -> Tables:
    return tables_for(namespace, *((f"d{i}.example", level) for i in range(count)))


async def test_a_split_table_is_read_part_by_part_and_a_missing_part_keeps_the_old_one(
        make_pod: PodFactory, kubectl: Kubectl, agent_user: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    [(name, inst)] = await seed_agent_pods(make_pod, kubectl, 1)
    with small_configmap_limits(monkeypatch):
        first = configmap_bodies(kubectl.ns, INSTANCE, many(kubectl.ns, 300, "encrypt"))
        second = configmap_bodies(kubectl.ns, INSTANCE, many(kubectl.ns, 300, "may"))
    assert len(first) > 2 and len(second) == len(first)
    for body in first:
        kubectl.put_configmap(body)
    async with running([make_agent(kubectl, name, inst)]):
        await poll(lambda: inst.query("d299.example") == "encrypt")
        kubectl.put_configmap(second[0])  # the new manifest before its parts

        def refused() -> Any:
            r = report(kubectl, name)
            return r if r is not None and r.error else None
        seen = await poll(refused, 10)
        assert "revisions" in seen.error or "sha256" in seen.error
        assert inst.query("d0.example") == "encrypt"  # never a mix of two revisions
        for body in second[1:]:  # the parts arrive; the next event of the primary takes them
            kubectl.put_configmap(body)
        kubectl.put_configmap({**second[0], "metadata": {
            **second[0]["metadata"], "labels": {**second[0]["metadata"]["labels"],
                                                "touched": "1"}}})
        await poll(lambda: inst.query("d0.example") == "may")


async def test_a_table_edited_in_the_pod_is_installed_again(
        make_pod: PodFactory, kubectl: Kubectl, agent_user: str) -> None:
    [(name, inst)] = await seed_agent_pods(make_pod, kubectl, 1)
    good = tables_for(kubectl.ns, ("e.example", "encrypt"))
    publish(kubectl, good)
    async with running([make_agent(kubectl, name, inst)]):
        await poll(lambda: inst.query("e.example") == "encrypt")
        old = tables_for(kubectl.ns, ("e.example", "none"))
        inst.install_table(inst.map_path, old.tls_policy)  # restored from an old backup
        assert inst.query("e.example") == "none"
        await poll(lambda: inst.query("e.example") == "encrypt", timeout=10)


async def test_the_mailtls_agent_command_runs_the_same_loop(
        make_pod: PodFactory, kubectl: Kubectl, agent_user: str, tmp_path: Path) -> None:
    """The CLI as the sidecar runs it (flags, POD_NAME/POD_NAMESPACE from the environment),
    with a kubeconfig holding its pod's token."""
    [(name, inst)] = await seed_agent_pods(make_pod, kubectl, 1)
    tables = tables_for(kubectl.ns, ("f.example", "encrypt"))
    publish(kubectl, tables)
    kubeconfig = kubectl.plane.kubeconfig_for_token(pod_token(kubectl, name),
                                                    tmp_path / "agent.kubeconfig")
    env = {**os.environ, **inst.env, "POD_NAME": name, "POD_NAMESPACE": kubectl.ns,
           "PATH": f"{inst.env['PATH']}:{os.environ.get('PATH', '')}"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailtls_operator.cli", "agent", "--instance", INSTANCE,
        "--kubeconfig", str(kubeconfig), "--map-path", str(inst.map_path),
        "--map-type", inst.settings.map_type, "--configmap-dir", str(inst.configmap_dir),
        "--observe-interval", "0", env=env, stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        await poll(lambda: inst.query("f.example") == "encrypt", timeout=20)
        await poll(lambda: applied(kubectl, name, tables), 10)
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert b"live and verified" in err


@BOTH_VERSIONS
async def test_the_version_lint_runs_on_what_the_agents_report(
        make_pod: PodFactory, kubectl: Kubectl, agent_user: str, audit_tail: AuditTail,
        postfix_version: str) -> None:
    """No exec: the agent's report carries ``mail_version`` (and the deprecated TLS
    parameters), so enable_rpk is held back from a 3.7 pod and rolled out to a 3.10 one."""
    [(name, inst)] = await seed_agent_pods(make_pod, kubectl, 1,
                                           extra_main_cf={"smtp_use_tls": "yes"})
    no_exec = NoPodsRunner()
    async with running([make_agent(kubectl, name, inst)]), operator(
            kubectl, no_exec, observe_interval=0.3):
        await kubectl.apply("fine", destinations=["fine.example"], level="encrypt")
        await poll(lambda: inst.query("fine.example") == "encrypt")
        # the table can land before the report that carries the facts: wait for those
        got = await poll(lambda: (r := report(kubectl, name)) is not None
                         and r.facts is not None and r)
        facts = got.facts.values
        assert facts["mail_version"].startswith(postfix_version + ".")
        await kubectl.apply("rpk", destinations=["rpk.example"], level="may", enableRPK=True)
        if postfix_version == "3.10":
            await kubectl.until_ready("rpk")
            await poll(lambda: inst.query("rpk.example") == "may enable_rpk=yes")
        else:
            held = await kubectl.until_ready("rpk", reason="UnsupportedAttribute")
            assert "enable_rpk needs Postfix 3.9" in held["message"]
            await poll(lambda: inst.query("rpk.example") is None)
        await kubectl.until_ready("fine")  # rolled out, with the deprecation noted once the
        note = "relay: main.cf sets smtp_use_tls = yes: Postfix 3.10 warns"  # facts are read
        await poll(lambda: note in ((kubectl.ready("fine") or {}).get("message") or ""))
    assert no_exec.calls == [] and kubectl.exec_requests(audit_tail) == 0
