"""The Argo CD health check of MailTLSDiscovery, run by a real lua5.1 against every case of
its health_test.yaml (the harness and runner of the MailTLSPolicy check)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailtls_operator.discovery.objects import load_discovery

from .kit import ROOT
from .test_argocd_health import HARNESS, _lua

CHECK_DIR = ROOT / "deploy" / "argocd" / "resource_customizations" / "mailtls.io" / \
    "MailTLSDiscovery"
CASES: list[dict[str, Any]] = yaml.safe_load(
    (CHECK_DIR / "health_test.yaml").read_text(encoding="utf-8"))["tests"]


@pytest.mark.parametrize("case", CASES, ids=[Path(c["inputPath"]).stem for c in CASES])
def test_discovery_health_case(case: dict[str, Any], tmp_path: Path) -> None:
    obj = yaml.safe_load((CHECK_DIR / case["inputPath"]).read_text(encoding="utf-8"))
    load_discovery(obj)  # every sample is a valid object
    path = tmp_path / "obj.json"
    path.write_text(json.dumps(obj), encoding="utf-8")
    done = subprocess.run([_lua(), str(HARNESS), str(CHECK_DIR / "health.lua"), str(path)],
                          capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == case["healthStatus"]


def test_every_sample_has_a_case() -> None:
    samples = sorted(p.relative_to(CHECK_DIR).as_posix()
                     for p in (CHECK_DIR / "testdata").glob("*.yaml"))
    assert samples == sorted(c["inputPath"] for c in CASES)
