"""The Argo CD health check (Lua 5.1), run by a real lua5.1 with lua-cjson against
every case of its health_test.yaml, as Argo CD's own test suite does."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailtls_operator.policy import validate_object

from .kit import ROOT

CHECK_DIR = ROOT / "deploy" / "argocd" / "resource_customizations" / "mailtls.io" / "MailTLSPolicy"
HARNESS = Path(__file__).with_name("argocd_health_harness.lua")
CASES: list[dict[str, Any]] = yaml.safe_load(
    (CHECK_DIR / "health_test.yaml").read_text(encoding="utf-8"))["tests"]


def _lua() -> str:
    lua = shutil.which("lua5.1")
    if lua is None:
        pytest.skip("needs lua5.1 and lua-cjson (make system-deps)")
    probe = subprocess.run([lua, "-e", "require('cjson')"], capture_output=True, timeout=10,
                           check=False)
    if probe.returncode != 0:
        pytest.skip("needs lua-cjson for lua5.1 (make system-deps)")
    return lua


def run_health(obj: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "obj.json"
    path.write_text(json.dumps(obj), encoding="utf-8")
    result = subprocess.run([_lua(), str(HARNESS), str(CHECK_DIR / "health.lua"), str(path)],
                            capture_output=True, text=True, timeout=10, check=False)
    assert result.returncode == 0, result.stderr
    out: dict[str, str] = json.loads(result.stdout)
    return out


@pytest.mark.parametrize("case", CASES, ids=[Path(c["inputPath"]).stem for c in CASES])
def test_health_case(case: dict[str, Any], tmp_path: Path) -> None:
    obj = yaml.safe_load((CHECK_DIR / case["inputPath"]).read_text(encoding="utf-8"))
    assert run_health(obj, tmp_path) == case["healthStatus"]


def test_every_sample_object_has_a_case_and_a_valid_spec() -> None:
    samples = sorted(p.relative_to(CHECK_DIR).as_posix()
                     for p in (CHECK_DIR / "testdata").glob("*.yaml"))
    assert samples == sorted(c["inputPath"] for c in CASES)
    assert {c["healthStatus"]["status"] for c in CASES} == {"Healthy", "Progressing",
                                                             "Degraded"}
    for sample in samples:
        obj = yaml.safe_load((CHECK_DIR / sample).read_text(encoding="utf-8"))
        assert validate_object(obj) == [], sample


def test_conditions_of_an_older_generation_never_degrade(tmp_path: Path) -> None:
    obj = yaml.safe_load((CHECK_DIR / "testdata" / "rollout_failed.yaml").read_text(
        encoding="utf-8"))
    obj["metadata"]["generation"] += 1
    assert run_health(obj, tmp_path)["status"] == "Progressing"
    obj["metadata"].pop("generation")  # an object without generation: conditions decide
    assert run_health(obj, tmp_path)["status"] == "Degraded"
