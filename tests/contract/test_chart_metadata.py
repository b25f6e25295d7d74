"""Chart.yaml's Artifact Hub annotations say what is true of this repository: the CRDs
listed are the CRDs shipped, the examples are valid objects of them, the image is the
one the chart deploys by default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from mailtls_operator.discovery.objects import load_discovery

from .kit import CHART, CRD_SOURCES, chart_objects, operator_container

ANNOTATIONS: dict[str, str] = yaml.safe_load(
    (CHART / "Chart.yaml").read_text(encoding="utf-8"))["annotations"]


def _listed(key: str) -> list[dict[str, Any]]:
    value = yaml.safe_load(ANNOTATIONS[f"artifacthub.io/{key}"])
    assert isinstance(value, list)
    return value


def _crd(path: Path) -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return crd


def test_listed_crds_are_the_shipped_crds() -> None:
    shipped = {(c["spec"]["names"]["kind"], c["metadata"]["name"],
                next(v["name"] for v in c["spec"]["versions"] if v.get("storage")))
               for c in map(_crd, CRD_SOURCES)}
    assert {(c["kind"], c["name"], c["version"]) for c in _listed("crds")} == shipped
    assert all(c["displayName"] and c["description"] for c in _listed("crds"))


def test_every_crd_has_an_example_the_offline_gate_accepts(tmp_path: Path) -> None:
    examples = _listed("crdsExamples")
    assert {e["kind"] for e in examples} == {c["kind"] for c in _listed("crds")}
    (tmp_path / "examples.yaml").write_text(yaml.safe_dump_all(examples), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "mailtls_operator.cli", "validate", "-f",
                           str(tmp_path / "examples.yaml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (
        0, "1 MailTLSPolicy object(s), 1 MailTLSDiscovery object(s) valid\n")
    (discovery,) = [e for e in examples if e["kind"] == "MailTLSDiscovery"]
    assert load_discovery(discovery).domains == ("partner.example",)


def test_the_image_is_the_one_the_chart_deploys() -> None:
    (image,) = _listed("images")
    deployed = operator_container(chart_objects({}))["image"]
    assert image["image"] == deployed


def test_operator_flags_and_repository_metadata() -> None:
    assert ANNOTATIONS["artifacthub.io/operator"] == "true"
    assert ANNOTATIONS["artifacthub.io/operatorCapabilities"] in (
        "Basic Install", "Seamless Upgrades", "Full Lifecycle", "Deep Insights", "Auto Pilot")
    assert ANNOTATIONS["artifacthub.io/license"] == "Apache-2.0"
    assert all(link["url"].startswith("https://") for link in _listed("links"))
    repo = yaml.safe_load((CHART / "artifacthub-repo.yml").read_text(encoding="utf-8"))
    assert set(repo) == {"repositoryID", "owners"}
