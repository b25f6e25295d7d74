"""The example Postfix Deployment in agent mode (manifests/examples/postfix-agent) and the
``mailtls agent`` command line it runs: restricted, token only for the agent, the same
volumes as Postfix, every flag documented."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from mailtls_operator.cli import build_parser

from .checks import all_problems
from .kit import EXAMPLES, chart_objects, find, kustomize

OVERLAY = EXAMPLES / "postfix-agent"
AGENT_VALUES = {"strategy": "agent",
                "agent": {"instances": [{"namespace": "mail", "name": "relay"}]}}


def pod_spec() -> dict[str, Any]:
    [deployment] = find(kustomize(OVERLAY), "Deployment", "relay")
    spec: dict[str, Any] = dict(deployment["spec"]["template"]["spec"])
    assert deployment["spec"]["template"]["metadata"]["annotations"][
        "mailtls.io/strategy"] == "agent"
    return spec


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in spec["containers"] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def test_the_overlay_builds_and_validates() -> None:
    assert all_problems(kustomize(OVERLAY)) == []


def test_the_agent_is_restricted_and_alone_in_holding_an_api_token() -> None:
    spec = pod_spec()
    agent = container(spec, "agent")
    sc = agent["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert agent["resources"]["requests"]["memory"] == "32Mi"
    assert spec["automountServiceAccountToken"] is False
    token_mounts = [c["name"] for c in spec["containers"] + spec.get("initContainers", [])
                    for m in c.get("volumeMounts", []) if m["name"] == "agent-token"]
    assert token_mounts == ["agent"]
    [token] = [v for v in spec["volumes"] if v["name"] == "agent-token"]
    assert any("serviceAccountToken" in s for s in token["projected"]["sources"])


def test_the_service_account_is_the_one_the_chart_grants() -> None:
    [binding] = [o for o in find(chart_objects(AGENT_VALUES), "RoleBinding")
                 if o["metadata"]["name"] == "mailtls-agent-relay"]
    assert binding["subjects"][0]["name"] == pod_spec()["serviceAccountName"]


def test_the_agent_sees_the_tables_queue_and_configmap_where_postfix_does() -> None:
    spec = pod_spec()
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
              for c in spec["containers"]}
    for volume in ("tables", "queue", "mailtls", "trust"):
        assert mounts["agent"][volume] == mounts["postfix"][volume], volume


def test_the_agent_args_are_accepted_by_mailtls_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    agent = container(pod_spec(), "agent")
    assert agent["command"] == ["mailtls", "agent"]
    env = {e["name"] for e in agent["env"]}
    assert {"POD_NAME", "POD_NAMESPACE"} <= env
    monkeypatch.setenv("POD_NAME", "relay-abc")
    monkeypatch.setenv("POD_NAMESPACE", "mail")
    args = build_parser().parse_args(["agent", *agent["args"]])
    assert (args.instance, args.pod, args.namespace) == ("relay", "relay-abc", "mail")
    assert args.map_path == "/var/lib/mailtls/tls_policy" and args.map_type == "lmdb"


def _agent_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    agent: argparse.ArgumentParser = sub.choices["agent"]
    return agent


def test_every_agent_flag_is_documented() -> None:
    parser = _agent_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 15
    undocumented = [a.option_strings[0] for a in flags if not (a.help or "").strip()]
    assert undocumented == []
    text = parser.format_help()
    for action in flags:
        assert action.option_strings[0] in text
