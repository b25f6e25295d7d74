"""The example Postfix Deployment in agent mode (manifests/examples/postfix-agent) and the
``mailtls agent`` command line it runs: restricted, token only for the agent, the same
volumes as Postfix, every flag documented; and its TLSRPT variant
(manifests/examples/postfix-agent-tlsrpt): main.cf turns TLSRPT on where the agent binds,
on a volume both containers mount, as the chart's release notes say."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from mailtls_operator.agent.tlsrpt import socket_path
from mailtls_operator.cli import build_parser

from .checks import all_problems
from .kit import EXAMPLES, chart_objects, find, kustomize, notes

OVERLAY = EXAMPLES / "postfix-agent"
TLSRPT_OVERLAY = EXAMPLES / "postfix-agent-tlsrpt"
AGENT_VALUES: dict[str, Any] = {
    "strategy": "agent", "agent": {"instances": [{"namespace": "mail", "name": "relay"}]}}


def pod_spec(overlay: Path = OVERLAY) -> dict[str, Any]:
    [deployment] = find(kustomize(overlay), "Deployment", "relay")
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


# ------------------------------------------------------------------- TLSRPT variant


def _main_cf(text: str) -> dict[str, str]:
    """main.cf's ``name = value`` lines (no continuation lines in the examples)."""
    return {k.strip(): v.strip() for line in text.splitlines()
            if line.strip() and not line.startswith(("#", " ", "\t"))
            for k, v in [line.split("=", 1)]}


def _rendered_main_cf() -> str:
    [cm] = [o for o in kustomize(TLSRPT_OVERLAY) if o["kind"] == "ConfigMap"
            and o["metadata"]["name"].startswith("relay-postfix")]
    text: str = cm["data"]["main.cf"]
    assert "load-tables.sh" in cm["data"]  # merged: the loader script is still there
    return text


def test_the_tlsrpt_overlay_builds_and_validates() -> None:
    assert all_problems(kustomize(TLSRPT_OVERLAY)) == []


def test_the_tlsrpt_main_cf_is_the_examples_plus_two_lines() -> None:
    base = (EXAMPLES / "postfix" / "main.cf").read_text()
    mine = (TLSRPT_OVERLAY / "main.cf").read_text()
    assert mine.startswith(base), "main.cf of postfix-agent-tlsrpt no longer extends ../postfix"
    added = _main_cf(mine[len(base):])
    assert added == {"smtp_tlsrpt_enable": "yes", "smtp_tlsrpt_socket_name": "tlsrpt/sock"}
    assert _rendered_main_cf() == mine
    values = _main_cf(mine)  # what TLSRPT needs besides: DNS, a global level above none
    assert values["smtp_dns_support_level"] in ("enabled", "dnssec")
    assert values["smtp_tls_security_level"] not in ("", "none")


def test_the_agent_binds_where_postfix_sends_on_a_volume_both_containers_mount(
        monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"queue_directory": "/var/spool/postfix", **_main_cf(_rendered_main_cf())}
    path, problem = socket_path(values)  # the agent's own reading of postconf -x
    assert (path, problem) == ("/var/spool/postfix/tlsrpt/sock", "") and path is not None
    spec = pod_spec(TLSRPT_OVERLAY)
    mounts = {c["name"]: {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
              for c in spec["containers"]}
    directory = path.rsplit("/", 1)[0]
    assert mounts["postfix"][directory] == mounts["agent"][directory] == "tlsrpt"
    [volume] = [v for v in spec["volumes"] if v["name"] == "tlsrpt"]
    assert "emptyDir" in volume  # world-writable: the unprivileged agent can bind in it
    monkeypatch.setenv("POD_NAME", "relay-abc")  # the Downward API's
    monkeypatch.setenv("POD_NAMESPACE", "mail")
    args = build_parser().parse_args(["agent", *container(spec, "agent")["args"]])
    assert args.tlsrpt_socket == "auto"  # main.cf decides
    images = {c["image"] for c in spec["containers"] + spec["initContainers"]}
    assert images == {"mailtls-example-postfix:0.1.0-trixie",
                      "mailtls-example-postfix-agent:0.1.0-trixie"}  # Postfix 3.10


def test_the_release_notes_print_the_overlays_set_up() -> None:
    text = notes({**AGENT_VALUES, "agent": {**AGENT_VALUES["agent"],
                                            "tlsrpt": {"enabled": True}}})
    values = _main_cf((TLSRPT_OVERLAY / "main.cf").read_text())
    for name in ("smtp_tlsrpt_enable", "smtp_tlsrpt_socket_name"):
        assert f"{name} = {values[name]}" in text
    assert "mountPath: /var/spool/postfix/tlsrpt}" in text
    assert "binds /var/spool/postfix/tlsrpt/sock" in text
    assert "manifests/examples/postfix-agent-tlsrpt/" in text
