"""The two images, checked statically (no container engine here): the operator's
Dockerfile and the example Postfix image, and that every place naming them agrees."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import pytest
import yaml

from .kit import CHART, EXAMPLES, ROOT, chart_objects, find, operator_container

OPERATOR_DOCKERFILE = ROOT / "operator" / "Dockerfile"
POSTFIX_DOCKERFILE = ROOT / "images" / "postfix" / "Dockerfile"
AGENT_DOCKERFILE = ROOT / "images" / "postfix-agent" / "Dockerfile"
RUN_SH = ROOT / "tests" / "e2e" / "run.sh"


def _stages(text: str) -> list[str]:
    return re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]


def test_operator_image_is_multi_stage_pinned_non_root() -> None:
    text = OPERATOR_DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?$",
                     text, re.MULTILINE), "base image must be an exact tag (or digest)"
    build, final = _stages(text)
    assert build.startswith("${PYTHON_IMAGE} AS build")
    assert "pip wheel" in build and "mailtls_operator/crd.yaml" in build
    assert final.startswith("${PYTHON_IMAGE}\n")
    assert "apt-get" not in final and "gcc" not in final and "COPY operator" not in final
    assert "--no-index" in final  # installs only the wheels built above
    assert re.search(r"^USER 65532:65532$", final, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["mailtls"\]$', final, re.MULTILINE)
    assert re.search(r'^CMD \["run"\]$', final, re.MULTILINE)


def test_the_wheel_carries_the_crd() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    include = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert include["crds/mailtlspolicies.mailtls.io.yaml"] == "mailtls_operator/crd.yaml"
    assert pyproject["project"]["scripts"]["mailtls"] == "mailtls_operator.cli:main"


def test_chart_runs_as_the_images_user() -> None:
    (deployment,) = find(chart_objects(), "Deployment")
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 65532


def test_postfix_image() -> None:
    text = POSTFIX_DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^ARG DEBIAN_IMAGE=debian:bookworm-slim(@sha256:[0-9a-f]{64})?$", text,
                     re.MULTILINE), "the official base by default, overridable by build arg"
    assert re.search(r"^FROM \$\{DEBIAN_IMAGE\}$", text, re.MULTILINE)
    assert re.search(r"install -y --no-install-recommends \\\s+postfix postfix-lmdb", text)
    assert "chroot = n" in text
    assert "ENTRYPOINT" in text


def test_agent_image_is_the_postfix_image_plus_the_package() -> None:
    text = AGENT_DOCKERFILE.read_text(encoding="utf-8")
    build, final = _stages(text)
    assert build.startswith("${PYTHON_IMAGE} AS build") and "pip wheel" in build
    assert final.startswith("${POSTFIX_IMAGE}\n")
    assert re.search(r"^ARG POSTFIX_IMAGE=mailtls-example-postfix:0\.1\.0$", text, re.MULTILINE)
    assert "--no-index" in final and "mailtls agent --help" in final
    overlay = yaml.safe_load((EXAMPLES / "postfix-agent" / "agent-sidecar.yaml").read_text(
        encoding="utf-8"))
    [agent] = [c for c in overlay["spec"]["template"]["spec"]["containers"]
               if c["name"] == "agent"]
    assert agent["image"] == "mailtls-example-postfix-agent:0.1.0"


def test_image_names_agree_between_e2e_chart_and_example() -> None:
    run = RUN_SH.read_text(encoding="utf-8")
    operator_image = re.search(r"^OPERATOR_IMAGE=(\S+)$", run, re.MULTILINE)
    postfix_image = re.search(r"^POSTFIX_IMAGE=(\S+)$", run, re.MULTILINE)
    assert operator_image and postfix_image
    assert operator_container(chart_objects())["image"] == operator_image.group(1)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert operator_image.group(1).endswith(":" + chart["appVersion"])
    deployment = yaml.safe_load((EXAMPLES / "postfix" / "deployment.yaml").read_text(
        encoding="utf-8"))
    pod = deployment["spec"]["template"]["spec"]
    assert {c["image"] for c in pod["containers"] + pod["initContainers"]} == {
        postfix_image.group(1)}


@pytest.mark.parametrize("script", [
    "tests/e2e/run.sh",
    "images/build.sh",
    "images/postfix/entrypoint.sh",
    "manifests/examples/postfix/load-tables.sh",
])
def test_shell_scripts_parse(script: str) -> None:
    shell = "bash" if script.endswith(("run.sh", "build.sh")) else "sh"
    if shutil.which(shell) is None:
        pytest.skip(f"no {shell}")
    result = subprocess.run([shell, "-n", str(ROOT / script)], capture_output=True, text=True,
                            timeout=10, check=False)
    assert result.returncode == 0, result.stderr


def test_e2e_without_kind_runs_on_this_machines_control_plane_and_says_what_it_skips() -> None:
    """`make e2e` where kind cannot run: the chart, the operator with the chart's token and
    the example Postfix Deployment on the real control plane, controllers and kwok here;
    what a kubelet would add is named, not silently left out."""
    if shutil.which("docker") and subprocess.run(
            ["docker", "info"], capture_output=True, timeout=20, check=False).returncode == 0:
        pytest.skip("a container engine is available here: run.sh takes the kind path")
    result = subprocess.run(["bash", str(RUN_SH), "e2e"], capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "no kind here" in result.stdout
    assert "not covered here (what a kubelet would add)" in result.stdout
    assert "e2e (real control plane + controllers + kwok) wall time:" in result.stdout
