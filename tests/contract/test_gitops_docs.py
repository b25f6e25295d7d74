"""docs/gitops.md stays true: its argocd-cm snippet is health.lua verbatim, and its Flux
healthCheckExprs (CEL) give the same verdict as the Argo CD check on every sample."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from .kit import ROOT
from .test_argocd_health import CASES, CHECK_DIR

DOC = ROOT / "docs" / "gitops.md"
ARGO_TO_KSTATUS = {"Healthy": "Current", "Progressing": "InProgress", "Degraded": "Failed"}


def _yaml_blocks() -> list[Any]:
    text = DOC.read_text(encoding="utf-8")
    return [doc for block in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
            for doc in yaml.safe_load_all(block) if doc]


def test_argocd_cm_snippet_is_health_lua_verbatim() -> None:
    (cm,) = [d for d in _yaml_blocks() if d.get("kind") == "ConfigMap"]
    snippet = cm["data"]["resource.customizations.health.mailtls.io_MailTLSPolicy"]
    assert snippet == (CHECK_DIR / "health.lua").read_text(encoding="utf-8")


def _flux_exprs() -> dict[str, str]:
    (expr,) = [e for d in _yaml_blocks() if d.get("kind") == "Kustomization"
               and d.get("apiVersion", "").startswith("kustomize.toolkit.fluxcd.io/")
               for e in d["spec"].get("healthCheckExprs", [])
               if e["kind"] == "MailTLSPolicy"]
    assert expr["apiVersion"] == "mailtls.io/v1alpha1"
    return {k: v for k, v in expr.items() if k in ("inProgress", "failed", "current")}


def flux_verdict(obj: dict[str, Any]) -> str:
    """Flux's order: inProgress, failed, current; the first true one decides."""
    import celpy
    import celpy.adapter

    env = celpy.Environment()
    activation = {k: celpy.adapter.json_to_cel(v) for k, v in obj.items()}
    for field, verdict in (("inProgress", "InProgress"), ("failed", "Failed"),
                           ("current", "Current")):
        result = env.program(env.compile(_flux_exprs()[field])).evaluate(activation)
        if isinstance(result, Exception):
            return "Error"
        if bool(result):
            return verdict
    return "InProgress"


@pytest.mark.parametrize("case", [c for c in CASES if "no_status" not in c["inputPath"]],
                         ids=lambda c: c["inputPath"].split("/")[-1][:-5])
def test_flux_health_expressions_agree_with_the_argocd_check(case: dict[str, Any]) -> None:
    obj = yaml.safe_load((CHECK_DIR / case["inputPath"]).read_text(encoding="utf-8"))
    assert flux_verdict(obj) == ARGO_TO_KSTATUS[case["healthStatus"]["status"]]


def test_flux_expressions_cannot_evaluate_without_status() -> None:
    obj = yaml.safe_load((CHECK_DIR / "testdata" / "no_status.yaml").read_text(
        encoding="utf-8"))
    assert flux_verdict(obj) in ("Error", "InProgress")
