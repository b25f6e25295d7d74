"""The chart in agent mode: no pods/exec anywhere, agent RBAC by resourceNames, the
admission policy that confines an agent to its own pod, evaluated with cel-python, and the
TLSRPT option (agent.tlsrpt): checked as the agent checks the socket name, the pod side
printed in the release notes."""

from __future__ import annotations

import copy
from typing import Any

import celpy
import helm_python as helm
import pytest

from mailtls_operator.agent.api import API_CALLS as AGENT_CALLS
from mailtls_operator.agent.report import AGENT_ANNOTATIONS

from .kit import chart_objects, find, notes, operator_container

AGENT: dict[str, Any] = {
    "strategy": "agent",
    "agent": {"instances": [{"namespace": "mail", "name": "relay"}], "maxParts": 2}}


def rules(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for kind in ("Role", "ClusterRole") for o in find(objects, kind)
            for r in o.get("rules") or []]


def test_agent_mode_grants_no_exec_to_anyone() -> None:
    objects = chart_objects(AGENT)
    assert all("pods/exec" not in r.get("resources", []) for r in rules(objects))
    assert all(not str(r.get("resources")).count("exec") for r in rules(objects))
    assert "--strategy=agent" in operator_container(objects)["args"]
    # the operator only reads pods in agent mode: the agents write their own annotations
    operator_pod_rules = [r for o in find(objects, "ClusterRole") for r in o.get("rules") or []
                          if "pods" in r.get("resources", [])]
    assert operator_pod_rules and all(sorted(r["verbs"]) == ["list", "watch"]
                                      for r in operator_pod_rules)


def test_the_agent_reads_only_its_instances_configmaps_and_patches_only_pods() -> None:
    objects = chart_objects(AGENT)
    [role] = [o for o in find(objects, "Role") if o["metadata"]["name"] == "mailtls-agent-relay"]
    assert role["metadata"]["namespace"] == "mail"
    cm, pods = role["rules"]
    assert cm["resources"] == ["configmaps"] and sorted(cm["verbs"]) == ["get", "watch"]
    assert cm["resourceNames"] == ["relay-mailtls", "relay-mailtls-part-1",
                                   "relay-mailtls-part-2"]
    assert pods == {"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}
    granted = {(v, r) for rule in role["rules"] for v in rule["verbs"]
               for r in rule["resources"]}
    assert {(v, r) for v, _, r in AGENT_CALLS} == granted  # what the agent calls, no more
    [binding] = [o for o in find(objects, "RoleBinding")
                 if o["metadata"]["name"] == "mailtls-agent-relay"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mailtls-agent-relay",
                                    "namespace": "mail"}]
    assert not any(o["metadata"].get("name") == "mailtls-agent-relay" for o in
                   find(objects, "ClusterRoleBinding"))


def _tlsrpt(**tlsrpt: Any) -> dict[str, Any]:
    return {**AGENT, "agent": {**AGENT["agent"], "tlsrpt": {"enabled": True, **tlsrpt}}}


def test_tlsrpt_changes_no_right_and_its_set_up_is_in_the_release_notes() -> None:
    assert chart_objects(_tlsrpt()) == chart_objects(AGENT)  # the report is the agent's
    assert "TLSRPT" not in notes(AGENT)
    text = notes(_tlsrpt(socketName="reports/tlsrpt.sock", queueDirectory="/var/spool/pf/"))
    assert "smtp_tlsrpt_enable = yes" in text
    assert "smtp_tlsrpt_socket_name = reports/tlsrpt.sock" in text
    assert "volumeMounts: [{name: tlsrpt, mountPath: /var/spool/pf/reports}]" in text
    assert "binds /var/spool/pf/reports/tlsrpt.sock" in text


@pytest.mark.parametrize(("tlsrpt", "why"), [
    ({"socketName": "private/tlsrpt"}, "is under private/"),
    ({"socketName": "./public/sock"}, "is under public/"),
    ({"socketName": "tlsrpt/../../sock"}, "leaves the queue directory"),
    ({"socketName": "sock"}, "name a directory below the queue directory"),
])
def test_a_socket_name_the_agent_cannot_collect_from_is_refused(tlsrpt: dict[str, Any],
                                                                   why: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=f"agent.tlsrpt.socketName .*{why}"):
        chart_objects(_tlsrpt(**tlsrpt))


def test_tlsrpt_without_the_agent_strategy_is_refused() -> None:
    with pytest.raises(helm.HelmRenderError, match=r"agent\.tlsrpt\.enabled needs strategy: agent"):
        chart_objects({"agent": {"tlsrpt": {"enabled": True}}})
    for bad in ({"socketName": "/abs/sock"}, {"socketName": "a b/sock"},
                {"queueDirectory": "spool"}, {"enabled": "yes"}):
        with pytest.raises(helm.HelmValuesError, match="tlsrpt"):
            chart_objects(_tlsrpt(**bad))


def test_exec_mode_renders_no_agent_objects() -> None:
    objects = chart_objects({})
    assert not [o for o in objects if "agent" in o["metadata"]["name"]]


# -- the admission policy, evaluated ------------------------------------------------


def _policy() -> dict[str, Any]:
    [vap] = find(chart_objects(AGENT), "ValidatingAdmissionPolicy")
    [binding] = find(chart_objects(AGENT), "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == vap["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    spec: dict[str, Any] = vap["spec"]
    return spec


def _eval(expression: str, activation: dict[str, Any]) -> bool:
    env = celpy.Environment()
    program = env.program(env.compile(expression))
    return bool(program.evaluate({k: celpy.adapter.json_to_cel(v) for k, v in activation.items()}))


def admitted(user: str, pod_claim: str | None, old: dict[str, Any],
             new: dict[str, Any]) -> bool:
    """What the API server decides for an UPDATE of a pod by ``user``."""
    spec = _policy()
    extra = {"authentication.kubernetes.io/pod-name": [pod_claim]} if pod_claim else {}
    activation = {"request": {"userInfo": {"username": user, "extra": extra}},
                  "object": new, "oldObject": old}
    if not all(_eval(c["expression"], activation) for c in spec["matchConditions"]):
        return True  # the policy does not apply to this user
    return all(_eval(v["expression"], activation) for v in spec["validations"])


POD: dict[str, Any] = {"metadata": {"name": "relay-0", "namespace": "mail",
                    "labels": {"mailtls.io/instance": "relay"},
                    "annotations": {"mailtls.io/strategy": "agent"}},
       "spec": {"containers": [{"name": "postfix", "image": "postfix"}]}}
AGENT_USER = "system:serviceaccount:mail:mailtls-agent-relay"


def patched(**annotations: str) -> dict[str, Any]:
    pod = copy.deepcopy(POD)
    pod["metadata"]["annotations"].update(annotations)
    return pod


def test_an_agent_may_write_its_report_on_its_own_pod() -> None:
    new = patched(**{a: "x" for a in AGENT_ANNOTATIONS})
    assert admitted(AGENT_USER, "relay-0", POD, new)
    assert admitted(AGENT_USER, "relay-0", new, patched(**{AGENT_ANNOTATIONS[0]: "y"}))


@pytest.mark.parametrize("case", ["other pod", "no claim", "strategy", "label", "spec",
                                  "foreign annotation", "remove annotation", "finalizer",
                                  "owner"])
def test_an_agent_may_not(case: str) -> None:
    old, new = POD, patched(**{AGENT_ANNOTATIONS[0]: "x"})
    claim: str | None = "relay-0"
    if case == "other pod":
        claim = "relay-1"
    elif case == "no claim":
        claim = None
    elif case == "strategy":
        new = patched(**{"mailtls.io/strategy": "exec"})
    elif case == "label":
        new = copy.deepcopy(POD)
        new["metadata"]["labels"]["mailtls.io/instance"] = "other"
    elif case == "spec":
        new = copy.deepcopy(POD)
        new["spec"]["containers"][0]["image"] = "evil"
    elif case == "foreign annotation":
        new = patched(**{"example.com/x": "1"})
    elif case == "remove annotation":
        new = copy.deepcopy(POD)
        del new["metadata"]["annotations"]["mailtls.io/strategy"]
    elif case == "finalizer":
        new["metadata"]["finalizers"] = ["example.com/hold"]
    elif case == "owner":
        new["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap",
                                               "name": "x", "uid": "1"}]
    assert not admitted(AGENT_USER, claim, old, new)


def test_the_policy_leaves_everyone_else_alone() -> None:
    new = copy.deepcopy(POD)
    new["spec"]["containers"][0]["image"] = "v2"
    assert admitted("system:serviceaccount:mailtls-system:mailtls-operator", None, POD, new)
    assert admitted("system:serviceaccount:mail:default", None, POD, new)
