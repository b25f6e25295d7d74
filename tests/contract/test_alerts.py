"""The chart's PrometheusRule: checked and unit-tested by promtool (each alert firing and
not firing), on series whose names and labels are exactly what the operator exports,
each alert with a summary, a description naming its object and a runbook that exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from mailtls_operator.discovery.service import DiscoveryService
from mailtls_operator.metrics import Metrics

from .checks import all_problems
from .kit import ROOT, chart_objects, find

HERE = Path(__file__).parent / "prometheus"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
ON = {"prometheusRule": {"enabled": True}}
#: Labels Prometheus adds to a scraped target's series (the operator's own `namespace`
#: and `instance` are kept: the chart's ServiceMonitor honours the exported labels).
TARGET_LABELS = {"job", "pod", "service", "endpoint", "container"}


def _rules(values: dict[str, Any]) -> list[dict[str, Any]]:
    (rule,) = find(chart_objects(values), "PrometheusRule")
    (group,) = rule["spec"]["groups"]
    rules: list[dict[str, Any]] = group["rules"]
    return rules


def _exported() -> dict[str, set[str]]:
    """Metric name -> label names, from the operator's own registries."""
    registry = CollectorRegistry()
    Metrics(registry=registry)

    async def _noop(*_: Any) -> None:
        return None

    DiscoveryService(wake=lambda _ns: None, write_status=_noop, post_event=_noop,
                     clock=lambda: datetime.now(UTC), registry=registry)
    out: dict[str, set[str]] = {}
    for collector in list(registry._collector_to_names):  # every metric, also unset ones
        for name in registry._collector_to_names[collector]:
            out[name] = set(getattr(collector, "_labelnames", ()))
    return out


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is missing: `make system-deps` installs Debian's prometheus")
    return found


def test_promtool_checks_and_unit_tests_pass(tmp_path: Path) -> None:
    promtool = _promtool()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": [
        {"name": "mailtls-operator", "rules": _rules(ON)}]}), encoding="utf-8")
    shutil.copy(HERE / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    for argv in ([promtool, "check", "rules", "rules.yaml"],
                 [promtool, "test", "rules", "alerts_test.yaml"]):
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load((HERE / "alerts_test.yaml").read_text(encoding="utf-8"))["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    alerts = {r["alert"] for r in _rules(ON)}
    assert firing == alerts
    assert silent == alerts


def test_test_series_are_shaped_as_the_operator_exports_them() -> None:
    exported = _exported()
    tests = yaml.safe_load((HERE / "alerts_test.yaml").read_text(encoding="utf-8"))["tests"]
    for case in tests:
        for item in case["input_series"]:
            name, _, labels = item["series"].partition("{")
            names = set(re.findall(r'([a-z_]+)="', labels))
            assert name in exported, name
            assert exported[name] <= names <= exported[name] | TARGET_LABELS, item["series"]


def test_every_metric_the_rules_read_is_exported_with_the_labels_they_group_by() -> None:
    exported = _exported()
    for rule in _rules(ON):
        metrics = set(re.findall(r"\b(mailtls_[a-z_]+)\b", rule["expr"]))
        assert metrics and metrics <= set(exported), rule["alert"]
        for by in re.findall(r"by \(([^)]*)\)", rule["expr"]):
            grouped = {b.strip() for b in by.split(",")}
            assert all(grouped <= exported[m] for m in metrics), rule["alert"]


def test_every_alert_has_summary_description_and_a_runbook_section() -> None:
    headings = {line[3:].strip().lower() for line in
                RUNBOOKS.read_text(encoding="utf-8").splitlines() if line.startswith("## ")}
    for rule in _rules(ON):
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"]
        url, _, anchor = notes["runbook_url"].partition("#")
        assert url.endswith("docs/runbooks.md") and anchor == rule["alert"].lower()
        assert anchor in headings, f"docs/runbooks.md has no section {rule['alert']}"
        assert rule["labels"]["severity"] in ("critical", "warning", "info")


def test_selector_labels_and_alert_labels_are_applied() -> None:
    values = {"prometheusRule": {"enabled": True, "selector": 'job="mailtls-operator-metrics"',
                                 "labels": {"release": "prom"},
                                 "alertLabels": {"team": "mail"}}}
    (rule,) = find(chart_objects(values), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prom"
    for item in rule["spec"]["groups"][0]["rules"]:
        assert item["labels"]["team"] == "mail"
        for selector in re.findall(r"mailtls_[a-z_]+\{([^}]*)\}", item["expr"]):
            # the selector, after an alert's own matchers (MailTLSSessionsFailing's result)
            assert selector.split(", ")[-1] == 'job="mailtls-operator-metrics"', selector
    assert all_problems(chart_objects(values)) == []


def test_off_by_default() -> None:
    assert find(chart_objects({}), "PrometheusRule") == []
