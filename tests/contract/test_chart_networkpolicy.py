"""The operator's NetworkPolicy: off by default; when on, ingress only to health and
metrics, egress only to the API server, DNS and (for MTA-STS discovery) HTTPS."""

from __future__ import annotations

import re
from typing import Any

import helm_python as helm
import pytest

from .checks import all_problems
from .kit import CHART, NAMESPACE, chart_objects, find

ON = {"networkPolicy": {"enabled": True}}


def _policy(values: dict[str, Any]) -> dict[str, Any]:
    found = [o for o in chart_objects(values) if o["kind"] == "NetworkPolicy"]
    assert len(found) == 1
    return found[0]


def _ports(rule: dict[str, Any]) -> set[tuple[int, str]]:
    return {(p["port"], p["protocol"]) for p in rule["ports"]}


def test_no_network_policy_by_default() -> None:
    assert [o for o in chart_objects({}) if o["kind"] == "NetworkPolicy"] == []


def test_it_selects_exactly_the_operator_pods() -> None:
    (deployment,) = find(chart_objects(ON), "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert _policy(ON)["spec"]["podSelector"]["matchLabels"] == selector
    assert _policy(ON)["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_ingress_is_only_health_and_metrics() -> None:
    ingress = _policy(ON)["spec"]["ingress"]
    assert [_ports(r) for r in ingress] == [{(8080, "TCP")}, {(9090, "TCP")}]
    no_metrics = _policy({**ON, "metrics": {"enabled": False}})["spec"]["ingress"]
    assert [_ports(r) for r in no_metrics] == [{(8080, "TCP")}]


def test_metrics_scrapers_can_be_narrowed_to_a_namespace() -> None:
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    values = {"networkPolicy": {"enabled": True, "ingress": {"metricsFrom": [peer]}}}
    metrics_rule = _policy(values)["spec"]["ingress"][1]
    assert metrics_rule["from"] == [peer]


def test_egress_is_api_server_dns_and_https_for_discovery_only() -> None:
    egress = _policy(ON)["spec"]["egress"]
    assert [_ports(r) for r in egress] == [
        {(443, "TCP"), (6443, "TCP")},
        {(53, "UDP"), (53, "TCP")},
        {(443, "TCP")},
    ]
    dns_peer = egress[1]["to"][0]
    assert dns_peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert [b["ipBlock"]["cidr"] for b in egress[2]["to"]] == ["0.0.0.0/0", "::/0"]
    assert not any(port == 25 for rule in egress for port, _ in _ports(rule))


def test_api_server_cidrs_and_switches_narrow_egress() -> None:
    values = {"networkPolicy": {"enabled": True, "egress": {
        "apiServer": {"cidrs": ["10.0.0.1/32"], "ports": [6443]},
        "dns": {"enabled": False}, "discovery": {"enabled": False},
        "extra": [{"ports": [{"port": 5353, "protocol": "UDP"}]}]}}}
    egress = _policy(values)["spec"]["egress"]
    assert egress[0] == {"ports": [{"port": 6443, "protocol": "TCP"}],
                         "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}]}
    assert egress[1:] == [{"ports": [{"port": 5353, "protocol": "UDP"}]}]


@pytest.mark.parametrize("values", [ON, {**ON, "watchNamespaces": ["mail"]},
                                    {**ON, "metrics": {"enabled": False}}])
def test_renders_validates_and_lints_with_it_on(values: dict[str, Any]) -> None:
    assert all_problems(chart_objects(values)) == []
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_bad_values_are_refused_by_the_schema() -> None:
    with helm.Chart.load(CHART) as chart:
        for bad, where in (({"networkPolicy": {"enabled": "yes"}}, "/networkPolicy/enabled"),
                           ({"networkPolicy": {"egress": {"apiServer": {"ports": [0]}}}},
                            "/networkPolicy/egress/apiServer/ports/0"),
                           ({"networkPolicy": {"ingres": {}}}, "ingres")):
            with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
                chart.validate_schema(bad)
