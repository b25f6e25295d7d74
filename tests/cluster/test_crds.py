"""The project's CRDs as a real kube-apiserver takes them: structural schema and CEL
rules compiled (with the server's own cost estimate) at create time, Established,
explained from the server's OpenAPI, printed with their columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from testbed.controlplane import REPO, ControlPlane
from tests.contract.kit import chart_objects

pytestmark = pytest.mark.cluster

CRD_FILES = sorted((REPO / "crds").glob("*.yaml"))


@pytest.fixture(scope="module")
def crds(controlplane: ControlPlane) -> list[str]:
    """The repository's CRDs applied; their names."""
    controlplane.apply_crds(CRD_FILES)
    return [yaml.safe_load(path.read_text())["metadata"]["name"] for path in CRD_FILES]


def _conditions(controlplane: ControlPlane, name: str) -> dict[str, str]:
    crd = json.loads(controlplane.kubectl("get", "crd", name, "-o", "json").stdout)
    return {c["type"]: c["status"] for c in crd["status"]["conditions"]}


def test_repository_crds_are_accepted_and_established(
        controlplane: ControlPlane, crds: list[str]) -> None:
    assert sorted(crds) == ["mailtlsdiscoveries.mailtls.io", "mailtlspolicies.mailtls.io"]
    for name in crds:
        conditions = _conditions(controlplane, name)
        assert conditions["NamesAccepted"] == "True", name
        assert conditions["Established"] == "True", name
        assert conditions.get("NonStructuralSchema") is None, name


def test_chart_rendered_crds_are_accepted_and_established(
        controlplane: ControlPlane, crds: list[str], tmp_path: Path) -> None:
    rendered = [obj for obj in chart_objects() if obj["kind"] == "CustomResourceDefinition"]
    assert len(rendered) == 2
    path = tmp_path / "chart-crds.yaml"
    path.write_text(yaml.safe_dump_all(rendered))
    controlplane.apply_crds([path])
    for obj in rendered:
        name = obj["metadata"]["name"]
        stored = json.loads(controlplane.kubectl("get", "crd", name, "-o", "json").stdout)
        assert stored["metadata"]["labels"]["app.kubernetes.io/name"] == "mailtls-operator"
        assert _conditions(controlplane, name)["Established"] == "True"
    controlplane.apply_crds(CRD_FILES)  # back to the repository's own, for later tests


def test_kubectl_explain_answers_from_the_server(
        controlplane: ControlPlane, crds: list[str]) -> None:
    out = controlplane.kubectl("explain", "mailtlspolicy.spec").stdout
    assert "KIND:" in out and "MailTLSPolicy" in out
    assert "VERSION:" in out and "mailtls.io/v1alpha1" in out
    for field in ("destinations", "level", "instances"):
        assert f"  {field}\t" in out or f"  {field} " in out, field


def test_printer_columns_show_in_kubectl_get(
        controlplane: ControlPlane, crds: list[str], namespace: str) -> None:
    example = yaml.safe_load((REPO / "manifests/examples/policies/secure.yaml").read_text())
    example["metadata"]["namespace"] = namespace
    controlplane.kubectl("apply", "-f", "-", input=json.dumps(example))
    name = example["metadata"]["name"]
    crd = yaml.safe_load((REPO / "crds/mailtlspolicies.mailtls.io.yaml").read_text())
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    wide = [c["name"].upper() for c in columns]
    default = [c["name"].upper() for c in columns if not c.get("priority")]

    table = controlplane.kubectl("get", "mailtlspolicies", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", *default]
    row = table[1].split()
    assert row[:2] == [name, "secure"]
    assert "example.com" in row[2] and ".example.com" in row[2]

    wide_table = controlplane.kubectl("get", "mtp", "-n", namespace, "-o", "wide").stdout
    assert wide_table.splitlines()[0].split() == ["NAME", *wide]
