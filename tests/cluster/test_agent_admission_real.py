"""The agent's least privilege, decided by the real server: the chart's agent Role (RBAC)
and its ValidatingAdmissionPolicy (CEL, evaluated by kube-apiserver's admission chain).

The agent of pod ``relay-0`` holds a token bound to that Pod (TokenRequest with
``boundObjectRef``), as the kubelet would project it.  With it, the agent's own client
(``AgentApi``) reads and watches its instance's ConfigMaps and sets its pod's two
mailtls.io annotations; every other write or read is answered 403 by RBAC or by the
admission policy, and the answer is asserted as the server words it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mailtls_operator.agent.api import AgentApi
from mailtls_operator.agent.report import AGENT_ANNOTATIONS, ANN_APPLIED, ANN_REPORT
from testbed.controlplane import ControlPlane
from testbed.wait import until
from tests.cluster.rbac_kit import MERGE, Answer, Caller, forbidden_message, pod
from tests.cluster.rbac_setup import Install, installed

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
STRATEGIC = "application/strategic-merge-patch+json"
FAKE_UID = "00000000-0000-4000-8000-000000000001"


def record(case: str, answer: Answer | str) -> None:
    """One server answer for the report (shown with ``pytest -s``)."""
    print(f"ADMISSION | {case} | {answer.line() if isinstance(answer, Answer) else answer}")


@dataclass
class Agents:
    install: Install
    caller: Caller  # relay-0's pod-bound token
    policy: str  # the ValidatingAdmissionPolicy's name
    enforced_after: float  # seconds from applying the policy to its first denial

    @property
    def user(self) -> str:
        sa = self.install.agent_service_account("relay")
        return f"system:serviceaccount:{self.install.watched}:{sa}"


def _configmap(name: str, ns: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name,
                                                                  "namespace": ns},
            "data": {"tls_policy": "a.example encrypt\n"}}


@pytest.fixture
def agents(controlplane: ControlPlane, namespace: str) -> Iterator[Agents]:
    """The chart (strategy agent; instances relay and second in <ns>-mail, other in
    <ns>-other) applied; two agent pods of relay and one of other; the instances'
    ConfigMaps, one of no instance, and a Secret."""
    controlplane.apply_crds(sorted((ROOT / "crds").glob("*.yaml")))
    cp = controlplane
    applied = time.monotonic()
    with installed(cp, namespace, "cluster", "agent") as inst:
        ns, other = inst.watched, inst.other
        for name, where in (("relay-0", ns), ("relay-1", ns), ("other-0", other)):
            cp.request("POST", f"/api/v1/namespaces/{where}/pods",
                       pod(where, name, instance=name.split("-")[0],
                           annotations={"mailtls.io/strategy": "agent"},
                           service_account=inst.agent_service_account(
                               name.split("-")[0])))
        for name, where in (("relay-mailtls", ns), ("relay-mailtls-part-1", ns),
                            ("second-mailtls", ns), ("web-config", ns),
                            ("other-mailtls", other)):
            cp.request("POST", f"/api/v1/namespaces/{where}/configmaps",
                       _configmap(name, where))
        cp.request("POST", f"/api/v1/namespaces/{ns}/secrets",
                   {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "smtp-key"},
                    "stringData": {"key": "secret"}})
        [vap] = [o["metadata"]["name"] for o in inst.objects
                 if o["kind"] == "ValidatingAdmissionPolicy"]
        caller = Caller(cp.url, cp.ca_file, cp.service_account_token(
            ns, inst.agent_service_account("relay"), pod="relay-0"))
        # The admission plugin loads policies from an informer: a fresh policy is
        # enforced only once it has been seen. Probe with a change it must refuse (an
        # annotation outside its two) until the first denial; before that it passes.
        probe = [0]

        def denied() -> bool:
            probe[0] += 1
            answer = caller("PATCH", f"/api/v1/namespaces/{ns}/pods/relay-0",
                            {"metadata": {"annotations": {"probe.example/n": str(probe[0])}}},
                            MERGE)
            return answer.status == 403 and "ValidatingAdmissionPolicy" in answer.message
        until(denied, 30, f"the ValidatingAdmissionPolicy {vap} is never enforced")
        yield Agents(inst, caller, vap, time.monotonic() - applied)


def test_the_admission_policy_api_is_served_and_a_fresh_policy_is_enforced_in_seconds(
        agents: Agents) -> None:
    """admissionregistration.k8s.io/v1 is on by default (GA in 1.30). The policy's
    status.typeChecking is written by kube-controller-manager, which does not run here;
    a CEL expression the server could not compile would instead deny every agent update
    (failurePolicy: Fail), which the allowed-patch test rules out."""
    group = agents.install.cp.request("GET", "/apis/admissionregistration.k8s.io/v1")
    served = {r["name"] for r in group["resources"]}
    assert {"validatingadmissionpolicies", "validatingadmissionpolicybindings"} <= served
    record("first denial after applying the policy", f"{agents.enforced_after:.2f} s")
    assert agents.enforced_after < 30


def test_the_agent_reads_its_configmaps_and_sets_its_own_pods_two_annotations(
        agents: Agents) -> None:
    ns = agents.install.watched
    api = AgentApi(agents.install.cp.url, token=lambda: agents.caller.token,
                   ca_file=str(agents.install.cp.ca_file))

    async def agent_calls() -> list[str]:
        seen = []
        for name in ("relay-mailtls", "relay-mailtls-part-1"):
            cm = await api.get_configmap(ns, name)
            seen.append(cm["metadata"]["name"])
        async for _kind, _obj in api.watch_configmap(
                ns, "relay-mailtls", cm["metadata"]["resourceVersion"], timeout_seconds=1):
            pass
        await api.patch_pod_annotations(ns, "relay-0", {ANN_APPLIED: "rev-1",
                                                        ANN_REPORT: '{"v":1}'})
        await api.close()
        return seen
    assert asyncio.run(agent_calls()) == ["relay-mailtls", "relay-mailtls-part-1"]
    annotations = agents.install.cp.request(
        "GET", f"/api/v1/namespaces/{ns}/pods/relay-0")["metadata"]["annotations"]
    assert {k: annotations[k] for k in AGENT_ANNOTATIONS} == {
        ANN_APPLIED: "rev-1", ANN_REPORT: '{"v":1}'}
    whoami = agents.caller.whoami()
    record("agent token user", f"{whoami['username']} extra={whoami.get('extra')}")
    assert whoami["extra"]["authentication.kubernetes.io/pod-name"] == ["relay-0"]


def _own(ns: str) -> str:
    return f"/api/v1/namespaces/{ns}/pods/relay-0"


def test_the_agent_is_refused_every_other_change_and_read(agents: Agents) -> None:
    inst, ns, other, vap = agents.install, agents.install.watched, agents.install.other, \
        agents.policy
    api = f"/api/v1/namespaces/{ns}"
    ours = {ANN_APPLIED: "rev-2"}
    own_pod_only = "a mailtls agent may patch only its own pod"
    no_spec = "a mailtls agent may not change a pod's spec or labels"
    owners = "a mailtls agent may not change a pod's finalizers or owner references"
    two_keys = ("a mailtls agent may change only the annotations "
                "mailtls.io/applied-revision and mailtls.io/agent-report")

    def rbac(verb: str, resource: str, where: str, name: str = "") -> str:
        return forbidden_message(agents.user, verb, resource, namespace=where, name=name)

    def admission(name: str, message: str) -> str:
        return (f'pods "{name}" is forbidden: ValidatingAdmissionPolicy \'{vap}\' with '
                f"binding '{vap}' denied request: {message}")

    unbound = Caller(inst.cp.url, inst.cp.ca_file,
                     inst.cp.service_account_token(ns, inst.agent_service_account("relay")))
    cases: list[tuple[str, Caller, str, str, dict[str, Any] | None, str, str]] = [
        ("another pod's mailtls annotations", agents.caller, "PATCH", f"{api}/pods/relay-1",
         {"metadata": {"annotations": ours}}, MERGE, admission("relay-1", own_pod_only)),
        ("own pod, another annotation", agents.caller, "PATCH", _own(ns),
         {"metadata": {"annotations": {"mailtls.io/strategy": "exec"}}}, MERGE,
         admission("relay-0", two_keys)),
        ("own pod, removing another annotation", agents.caller, "PATCH", _own(ns),
         {"metadata": {"annotations": {"mailtls.io/strategy": None}}}, MERGE,
         admission("relay-0", two_keys)),
        ("own pod, a finalizer", agents.caller, "PATCH", _own(ns),
         {"metadata": {"finalizers": ["example.com/hold"]}}, MERGE,
         admission("relay-0", owners)),
        ("own pod, its owner references", agents.caller, "PATCH", _own(ns),
         {"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap",
                                            "name": "web-config", "uid": FAKE_UID}]}},
         MERGE, admission("relay-0", owners)),
        ("own pod, a label", agents.caller, "PATCH", _own(ns),
         {"metadata": {"labels": {"mailtls.io/instance": "other"}}}, MERGE,
         admission("relay-0", no_spec)),
        ("own pod, the spec (image)", agents.caller, "PATCH", _own(ns),
         {"spec": {"containers": [{"name": "postfix", "image": "evil:1"}]}}, STRATEGIC,
         admission("relay-0", no_spec)),
        ("own pod's annotations with a token not bound to it", unbound, "PATCH", _own(ns),
         {"metadata": {"annotations": ours}}, MERGE, admission("relay-0", own_pod_only)),
        ("own pod's status", agents.caller, "PATCH", f"{_own(ns)}/status",
         {"status": {"phase": "Failed"}}, MERGE, rbac("patch", "pods/status", ns, "relay-0")),
        ("delete own pod", agents.caller, "DELETE", f"{_own(ns)}?dryRun=All", None, "",
         rbac("delete", "pods", ns, "relay-0")),
        ("create a pod", agents.caller, "POST", f"{api}/pods?dryRun=All",
         pod(ns, "x", instance="relay"), "application/json", rbac("create", "pods", ns)),
        ("a pod in another namespace", agents.caller, "PATCH",
         f"/api/v1/namespaces/{other}/pods/other-0", {"metadata": {"annotations": ours}},
         MERGE, rbac("patch", "pods", other, "other-0")),
        ("another instance's ConfigMap in the same namespace", agents.caller, "GET",
         f"{api}/configmaps/second-mailtls", None, "",
         rbac("get", "configmaps", ns, "second-mailtls")),
        ("another instance's ConfigMap in another namespace", agents.caller, "GET",
         f"/api/v1/namespaces/{other}/configmaps/other-mailtls", None, "",
         rbac("get", "configmaps", other, "other-mailtls")),
        ("a ConfigMap of no instance", agents.caller, "GET", f"{api}/configmaps/web-config",
         None, "", rbac("get", "configmaps", ns, "web-config")),
        ("list ConfigMaps", agents.caller, "GET", f"{api}/configmaps", None, "",
         rbac("list", "configmaps", ns)),
        ("write its own ConfigMap", agents.caller, "PATCH",
         f"{api}/configmaps/relay-mailtls?dryRun=All", {"data": {"tls_policy": ""}}, MERGE,
         rbac("patch", "configmaps", ns, "relay-mailtls")),
        ("get a Secret", agents.caller, "GET", f"{api}/secrets/smtp-key", None, "",
         rbac("get", "secrets", ns, "smtp-key")),
        ("list Secrets", agents.caller, "GET", f"{api}/secrets", None, "",
         rbac("list", "secrets", ns)),
    ]
    wrong = []
    for case, caller, method, path, body, ctype, expected in cases:
        answer = caller(method, path, body, ctype or "application/json")
        record(f"agent: {case}", answer)
        if (answer.status, answer.reason) != (403, "Forbidden") or \
                not answer.message.startswith(expected):
            wrong.append((case, answer.line(), expected))
    assert wrong == []
    pods = inst.cp.request("GET", f"{api}/pods/relay-1")
    assert not set(pods["metadata"].get("annotations") or {}) & set(AGENT_ANNOTATIONS)
