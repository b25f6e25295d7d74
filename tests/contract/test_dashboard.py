"""The Grafana dashboard: generated from tools/dashboard.py, committed, and shipped by the
chart as a ConfigMap Grafana's dashboard sidecar loads by its label."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from types import ModuleType
from typing import Any

from .kit import NAMESPACE, ROOT, chart_objects, find

ON = {"grafanaDashboard": {"enabled": True}}
COMMITTED = ROOT / "charts/mailtls-operator/files/dashboards/mailtls-operator.json"


def load_builder(name: str = "dashboard") -> ModuleType:
    """tools/<name>.py (a script, not a package module) imported by path."""
    spec = importlib.util.spec_from_file_location(f"mailtls_tools_{name}",
                                                  ROOT / f"tools/{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _dashboards(values: dict[str, Any]) -> list[dict[str, Any]]:
    return [o for o in find(chart_objects(values), "ConfigMap")
            if o["metadata"]["name"].endswith("-dashboard")]


def test_the_committed_json_is_what_the_code_generates() -> None:
    builder = load_builder()
    assert COMMITTED.read_text() == builder.render(), \
        "stale dashboard JSON: run `make dashboard` (python tools/dashboard.py)"


def test_every_panel_queries_only_mailtls_metrics_with_its_own_reference() -> None:
    model = json.loads(COMMITTED.read_text())
    panels = [p for p in model["panels"] if p["type"] != "row"]
    assert len(panels) == len(load_builder().PANELS)
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            names = set(re.findall(r"\b(mailtls_[a-z_]+)", target["expr"]))
            assert names, (panel["title"], target["expr"])
            assert target["datasource"]["uid"] == "${datasource}"
    assert [v["name"] for v in model["templating"]["list"]] == ["datasource"]


def test_no_dashboard_by_default() -> None:
    assert _dashboards({}) == []


def test_the_configmap_carries_the_sidecar_label_and_the_committed_json() -> None:
    (cm,) = _dashboards(ON)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == NAMESPACE
    assert json.loads(cm["data"]["mailtls-operator.json"]) == json.loads(COMMITTED.read_text())


def test_label_value_namespace_and_annotations_are_settable() -> None:
    (cm,) = _dashboards({"grafanaDashboard": {
        "enabled": True, "label": "grafana.com/dashboard", "labelValue": "mail",
        "namespace": "monitoring", "labels": {"team": "mail"},
        "annotations": {"grafana_folder": "Mail"}}})
    labels = cm["metadata"]["labels"]
    assert labels["grafana.com/dashboard"] == "mail" and "grafana_dashboard" not in labels
    assert labels["team"] == "mail"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Mail"}
