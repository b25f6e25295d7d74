"""The recipes in docs/integrations/, rendered with the real charts they are written for.

Each Postfix chart (boky/postfix ``helm/mail``, docker-mailserver, Mailu) is rendered by
Helm's own Go code (helm-python-sdk) from an export of the exact commit the recipe was
checked against, with the recipe's values file; the post-renderer patches are applied
with ``kubectl kustomize`` as Helm's ``--post-renderer`` would. Then the pod template
must be an instance the operator and the agent can work with: the label and
annotations, the emptyDir at the map path in Postfix's container, the agent sidecar
with its ServiceAccount and projected token, and the operator's table first in
``smtp_tls_policy_maps``.

The charts are not part of this repository: ``sh tools/export-integration-charts.sh``
exports them into ``~/.cache/mailtls/integrations`` (or $MAILTLS_INTEGRATIONS_CACHE).
Without that export the rendering tests are skipped, saying so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from .kit import ROOT, chart_objects, find

DOCS = ROOT / "docs" / "integrations"
CACHE = Path(os.environ.get("MAILTLS_INTEGRATIONS_CACHE",
                            Path.home() / ".cache" / "mailtls" / "integrations"))
EXPORT_HINT = "sh tools/export-integration-charts.sh"

Obj = dict[str, Any]


@dataclass(frozen=True)
class Recipe:
    """One chart, the commit and version its recipe was checked against, and how its
    rendered objects say where main.cf's smtp_tls_policy_maps comes from."""

    doc: str
    export: str           # <name>-<commit12>/<chart dir> under CACHE
    version: str          # Chart.yaml version at that commit
    commit: str
    release: str
    instance: str
    workload: str         # kind/name of the rendered workload
    patch: str | None     # post-renderer patch file in docs/integrations, if any
    extra_values: tuple[tuple[str, Any], ...] = ()

    @property
    def values_file(self) -> Path:
        return DOCS / f"{self.doc}.values.yaml"

    @property
    def chart_dir(self) -> Path:
        return CACHE / self.export


RECIPES = {
    "boky-postfix": Recipe(
        "boky-postfix", "boky-mail-a2687c54f9ad/mail", "1.0.0",
        "a2687c54f9ad03b8858a31c676a9010d97da917d", "relay", "relay",
        "StatefulSet/relay", None),
    "docker-mailserver": Recipe(
        "docker-mailserver", "docker-mailserver-f641031faace/docker-mailserver", "5.1.1",
        "f641031faace2fd13dbe4cfc9d8b9a70fbd1c77e", "mailserver", "mailserver",
        "Deployment/mailserver", "docker-mailserver.agent-patch.yaml"),
    "mailu": Recipe(
        "mailu", "mailu-8a59cb65ab0f/mailu", "2.7.1",
        "8a59cb65ab0f704c5769749f8e90f41045c465a3", "mailu", "mailu",
        "Deployment/mailu-postfix", "mailu.agent-patch.yaml",
        # what any Mailu install must set; not part of the recipe
        (("domain", "example.com"), ("hostnames", ["mail.example.com"]))),
}


def _values(recipe: Recipe) -> Obj:
    values: Obj = yaml.safe_load(recipe.values_file.read_text())
    values.update(dict(recipe.extra_values))
    return values


def _render(recipe: Recipe) -> list[Obj]:
    if not (recipe.chart_dir / "Chart.yaml").is_file():
        pytest.skip(f"NOT VERIFIED: the {recipe.doc} chart export {recipe.chart_dir} is "
                    f"missing; run `{EXPORT_HINT}` to render the recipe with the real chart")
    import helm_python as helm

    with helm.Chart.load(recipe.chart_dir) as chart:
        rendered = chart.render(_values(recipe), name=recipe.release, namespace="mail",
                                is_install=True)
    text = "\n---\n".join(t for p, t in sorted(rendered.items()) if not p.endswith("NOTES.txt"))
    if recipe.patch:
        text = _post_render(text, DOCS / recipe.patch)
    return [o for o in yaml.safe_load_all(text) if o]


def _post_render(text: str, patch: Path) -> str:
    """The render through the docs' own post-renderer script, as Helm would pipe it."""
    if shutil.which("kubectl") is None:
        pytest.skip("needs kubectl for `kubectl kustomize` (Debian kubectl: make system-deps)")
    result = subprocess.run(["sh", str(DOCS / "mailtls-post-render.sh")], input=text,
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "MAILTLS_PATCH": str(patch)})
    assert result.returncode == 0, result.stderr
    return result.stdout


def _workload(objects: list[Obj], recipe: Recipe) -> Obj:
    kind, name = recipe.workload.split("/")
    [workload] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return workload


def _maps(value: str) -> list[str]:
    return [m for m in re.split(r"[\s,]+", value.strip()) if m]


def _policy_maps(objects: list[Obj], recipe: Recipe) -> list[str]:
    """smtp_tls_policy_maps as the chart hands it to the image's start script."""
    configmaps = {o["metadata"]["name"]: o.get("data") or {} for o in find(objects, "ConfigMap")}
    if recipe.doc == "boky-postfix":   # env POSTFIX_<key>, applied with postconf -e
        return _maps(configmaps[recipe.release]["POSTFIX_smtp_tls_policy_maps"])
    if recipe.doc == "docker-mailserver":   # postfix-main.cf, appended to main.cf
        text = configmaps["postfix-main-cf"]["postfix-main.cf"]
    else:   # Mailu: /overrides/postfix.cf, each line through postconf -e
        text = configmaps[f"{recipe.release}-postfix-override"]["postfix.cf"]
    lines = [line for line in text.splitlines() if line.startswith("smtp_tls_policy_maps")]
    assert len(lines) == 1, lines
    return _maps(lines[0].split("=", 1)[1])


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_recipe_makes_the_pods_an_instance_with_its_table_directory(name: str) -> None:
    recipe = RECIPES[name]
    workload = _workload(_render(recipe), recipe)
    template = workload["spec"]["template"]
    meta, spec = template["metadata"], template["spec"]
    assert meta["labels"]["mailtls.io/instance"] == recipe.instance
    notes = meta["annotations"]
    assert notes["mailtls.io/strategy"] == "agent"
    map_path = notes["mailtls.io/map-path"]
    containers = {c["name"]: c for c in spec["containers"]}
    postfix = containers[notes["mailtls.io/container"]]   # names a real container
    volumes = {v["name"]: v for v in spec["volumes"]}
    claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
    [table_mount] = [m for m in postfix["volumeMounts"]
                     if m["mountPath"] == os.path.dirname(map_path)]
    assert "emptyDir" in volumes[table_mount["name"]]
    assert not table_mount.get("readOnly")
    for container in spec["containers"] + spec.get("initContainers", []):
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes or mount["name"] in claims, \
                (container["name"], mount["name"])


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_recipe_adds_the_agent_with_its_service_account_and_bound_token(
        name: str) -> None:
    recipe = RECIPES[name]
    template = _workload(_render(recipe), recipe)["spec"]["template"]
    notes, spec = template["metadata"]["annotations"], template["spec"]
    [agent] = [c for c in spec["containers"] if c.get("command") == ["mailtls", "agent"]]
    args = agent["args"]
    assert f"--instance={recipe.instance}" in args
    assert f"--map-path={notes['mailtls.io/map-path']}" in args
    assert f"--map-type={notes['mailtls.io/map-type']}" in args
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    assert spec["serviceAccountName"] == f"mailtls-agent-{recipe.instance}"
    volumes = {v["name"]: v for v in spec["volumes"]}
    [token] = [m for m in agent["volumeMounts"]
               if m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"]
    sources = volumes[token["name"]]["projected"]["sources"]
    assert any("serviceAccountToken" in s for s in sources)
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    postfix = next(c for c in spec["containers"]
                   if c["name"] == notes["mailtls.io/container"])
    table_dir = os.path.dirname(notes["mailtls.io/map-path"])
    assert mounts[table_dir] == {m["mountPath"]: m["name"]
                                 for m in postfix["volumeMounts"]}[table_dir]   # shared
    assert agent["securityContext"]["runAsNonRoot"] is True
    # a loader fills the table before Postfix starts, with the same type
    [loader] = [c for c in spec["initContainers"] if c["name"] == "mailtls-load-tables"]
    assert {e["name"]: e["value"] for e in loader["env"]}["MAP_TYPE"] == \
        notes["mailtls.io/map-type"]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_operators_table_comes_first_in_smtp_tls_policy_maps(name: str) -> None:
    recipe = RECIPES[name]
    objects = _render(recipe)
    notes = _workload(objects, recipe)["spec"]["template"]["metadata"]["annotations"]
    maps = _policy_maps(objects, recipe)
    assert maps[0] == f"{notes['mailtls.io/map-type']}:{notes['mailtls.io/map-path']}"
    # Mailu runs each override line through a shell: no $variable may be in it
    assert not any("$" in m for m in maps)


def test_mailu_keeps_its_own_tls_policy_dane_and_mta_sts_after_ours() -> None:
    recipe = RECIPES["mailu"]
    maps = _policy_maps(_render(recipe), recipe)
    # Mailu 2024.06's main.cf: lmdb:/etc/postfix/tls_policy.map, ${podop}dane, mta-sts
    assert maps[1:] == ["lmdb:/etc/postfix/tls_policy.map", "socketmap:unix:/tmp/podop.socket:dane",
                        "socketmap:unix:/tmp/mta-sts.socket:postfix"]


# ------------------------------------------------- no chart export needed below


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_page_shows_its_values_and_patch_verbatim_and_names_the_checked_version(
        name: str) -> None:
    recipe = RECIPES[name]
    page = (DOCS / f"{recipe.doc}.md").read_text()
    assert recipe.values_file.read_text().strip() in page
    if recipe.patch:
        assert (DOCS / recipe.patch).read_text().strip() in page
    assert recipe.commit in page and f"version {recipe.version}" in page


def test_the_index_links_every_recipe_and_the_readme_links_the_index() -> None:
    index = (DOCS / "README.md").read_text()
    for name in RECIPES:
        assert f"({name}.md)" in index
    assert "docs/integrations/" in (ROOT / "README.md").read_text()


def test_the_agent_service_accounts_the_recipes_name_mount_no_token_by_themselves() -> None:
    instances = [{"namespace": "mail", "name": r.instance} for r in RECIPES.values()]
    objects = chart_objects({"strategy": "agent", "agent": {"instances": instances}})
    for recipe in RECIPES.values():
        [account] = find(objects, "ServiceAccount", f"mailtls-agent-{recipe.instance}")
        assert account["metadata"]["namespace"] == "mail"
        assert account["automountServiceAccountToken"] is False
