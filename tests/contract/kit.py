"""The packaging, rendered offline: the Helm chart (Helm's own Go code, through
helm-python-sdk), the kustomize trees (``kubectl kustomize``), and the generator of
the kustomize files derived from the chart.

One source of truth: the chart's templates hold the RBAC rules and the operator's
arguments; ``manifests/base`` and the generated parts of
``manifests/overlays/namespaced`` are rendered from it. Regenerate after changing
the chart or ``crds/``::

    .venv/bin/python -m tests.contract.kit

The contract tests fail while a generated file is stale.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_SOURCE = ROOT / "crds" / "mailtlspolicies.mailtls.io.yaml"
#: Every CRD, each copied byte for byte into the chart and the kustomize base.
CRD_SOURCES = (CRD_SOURCE, ROOT / "crds" / "mailtlsdiscoveries.mailtls.io.yaml")
CHART = ROOT / "charts" / "mailtls-operator"
CHART_CRD_COPY = CHART / "files" / "crds" / CRD_SOURCE.name
MANIFESTS = ROOT / "manifests"
BASE = MANIFESTS / "base"
OVERLAY_NAMESPACED = MANIFESTS / "overlays" / "namespaced"
EXAMPLES = MANIFESTS / "examples"

RELEASE = "mailtls-operator"
NAMESPACE = "mailtls-system"
#: The namespaces the namespaced overlay watches (the example Postfix lives in "mail").
OVERLAY_NAMESPACES = ["mail"]
#: The Kubernetes version whose OpenAPI schemas the objects are validated against.
KUBE_VERSION = "1.30"
OPERATOR_CONTAINER = "operator"

Obj = dict[str, Any]


# ------------------------------------------------------------------------ helm chart


@functools.cache
def _render_cached(values_json: str) -> tuple[tuple[str, str], ...]:
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(json.loads(values_json), name=RELEASE, namespace=NAMESPACE,
                                is_install=True)
    return tuple(sorted(rendered.items()))


def render_chart(values: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, exactly as ``helm template`` would produce it."""
    return dict(_render_cached(json.dumps(values or {}, sort_keys=True)))


def parse_docs(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def chart_objects(values: Mapping[str, Any] | None = None) -> list[Obj]:
    """Every object of a render (NOTES.txt left out; crds/ files are separate)."""
    out: list[Obj] = []
    for path, text in sorted(render_chart(values).items()):
        if not path.endswith("NOTES.txt"):
            out.extend(parse_docs(text))
    return out


def chart_crd_objects() -> list[Obj]:
    """The objects in the chart's crds/ directory (installed by Helm itself); the chart
    has none since Kopf peering is gone, and the tests keep it so."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        return [doc for item in chart.crds for doc in parse_docs(item["data"])]


def notes(values: Mapping[str, Any] | None = None) -> str:
    return next(text for path, text in render_chart(values).items()
                if path.endswith("NOTES.txt"))


# ------------------------------------------------------------------------- kustomize


@functools.cache
def _kustomize_cached(path: Path) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        import pytest

        pytest.skip("needs kubectl for `kubectl kustomize` (Debian kubectl: make system-deps)")
    result = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed: {result.stderr.strip()}")
    return result.stdout


def kustomize(path: Path) -> list[Obj]:
    """``kubectl kustomize PATH``, parsed (a fresh copy each call; the build is cached)."""
    return parse_docs(_kustomize_cached(path))


# ----------------------------------------------------------------- what is granted


Grant = tuple[str, str, str, str, str]  # (scope, apiGroup, resource, verb, resourceName)


def _rules_of(role: Obj) -> list[Obj]:
    return list(role.get("rules") or [])


def _expand(rules: Iterable[Obj], scope: str) -> set[Grant]:
    out: set[Grant] = set()
    for rule in rules:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule.get("verbs", []):
                    for name in rule.get("resourceNames") or ["*"]:
                        out.add((scope, group, resource, verb, name))
    return out


def operator_grants(objects: list[Obj], service_account: str = RELEASE,
                    namespace: str = NAMESPACE) -> set[Grant]:
    """The rights the operator's ServiceAccount gets from these objects.

    ``scope`` is ``"*"`` for a ClusterRole bound with a ClusterRoleBinding (every
    namespace, and cluster-scoped resources), else the namespace of the RoleBinding.
    Roles bound to anybody else (the aggregated viewer/editor roles) do not count.
    """
    def key(obj: Obj) -> tuple[str, str, str]:
        meta = obj["metadata"]
        return obj["kind"], meta.get("namespace", ""), meta["name"]

    roles = {key(o): o for o in objects if o.get("kind") in ("Role", "ClusterRole")}
    grants: set[Grant] = set()
    for binding in objects:
        if binding.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        subjects = binding.get("subjects") or []
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == service_account
                   and s.get("namespace") == namespace for s in subjects):
            continue
        ref = binding["roleRef"]
        if binding["kind"] == "ClusterRoleBinding":
            scope, role_ns = "*", ""
        else:
            scope = binding["metadata"]["namespace"]
            role_ns = scope if ref["kind"] == "Role" else ""
        role = roles.get((ref["kind"], role_ns, ref["name"]))
        if role is None:
            raise LookupError(f"{binding['kind']} {binding['metadata']['name']} refers to "
                              f"missing {ref['kind']} {ref['name']}")
        grants |= _expand(_rules_of(role), scope)
    return grants


def find(objects: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objects
            if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)]


def operator_container(objects: list[Obj]) -> Obj:
    (deployment,) = find(objects, "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    (container,) = [c for c in containers if c["name"] == OPERATOR_CONTAINER]
    result: Obj = container
    return result


# ------------------------------------------------------------------------ generator

HEADER = """\
# GENERATED by `.venv/bin/python -m tests.contract.kit` from charts/mailtls-operator,
# {what}.
# Do not edit: change the chart and regenerate; tests/contract fails while stale.
"""

_HELM_ONLY_LABEL = re.compile(r"^[ \t]*helm\.sh/chart: .*\n", re.MULTILINE)


def _for_kustomize(text: str) -> str:
    """A Helm render -> plain manifests: no Helm bookkeeping labels."""
    text = _HELM_ONLY_LABEL.sub("", text)
    text = text.replace("app.kubernetes.io/managed-by: Helm",
                        "app.kubernetes.io/managed-by: kustomize")
    return text


def _split(text: str) -> list[str]:
    """A multi-document render -> its documents' texts (comments kept)."""
    docs = re.split(r"^---[ \t]*\n", text, flags=re.MULTILINE)
    return [d.strip("\n") + "\n" for d in docs if yaml.safe_load(d)]


def _docs(rendered: Mapping[str, str], template: str, kinds: Iterable[str] = ()) -> list[str]:
    text = rendered[f"mailtls-operator/templates/{template}"]
    wanted = set(kinds)
    return [d for d in _split(_for_kustomize(text))
            if not wanted or yaml.safe_load(d)["kind"] in wanted]


def _file(what: str, docs: list[str]) -> str:
    return HEADER.format(what=what) + "---\n".join(docs)


def generate() -> dict[Path, str]:
    """Every generated file under manifests/ and the chart's CRD copy, by path."""
    out: dict[Path, str] = {}
    for source in CRD_SOURCES:
        crd_text = source.read_text(encoding="utf-8")
        out[CHART_CRD_COPY.parent / source.name] = crd_text
        out[BASE / "crds" / source.name] = crd_text

    defaults = render_chart({})
    what = f'default values, release "{RELEASE}", namespace "{NAMESPACE}"'
    out[BASE / "serviceaccount.yaml"] = _file(what, _docs(defaults, "serviceaccount.yaml"))
    out[BASE / "rbac.yaml"] = _file(what, _docs(defaults, "rbac.yaml"))
    out[BASE / "aggregate-clusterroles.yaml"] = _file(
        what, _docs(defaults, "aggregate-clusterroles.yaml"))
    out[BASE / "leader-election.yaml"] = _file(what, _docs(defaults, "leader-election.yaml"))
    out[BASE / "deployment.yaml"] = _file(what, _docs(defaults, "deployment.yaml"))
    out[BASE / "poddisruptionbudget.yaml"] = _file(what, _docs(defaults,
                                                               "poddisruptionbudget.yaml"))
    out[BASE / "service.yaml"] = _file(what, _docs(defaults, "service.yaml"))

    values = {"watchNamespaces": OVERLAY_NAMESPACES}
    scoped = render_chart(values)
    what = f"watchNamespaces: {json.dumps(OVERLAY_NAMESPACES)}"
    out[OVERLAY_NAMESPACED / "namespaced-rbac.yaml"] = _file(
        what, _docs(scoped, "rbac.yaml", ["Role", "RoleBinding"]))
    out[OVERLAY_NAMESPACED / "patch-clusterrole.yaml"] = _file(
        what + "; a patch that replaces the base's rules",
        _docs(scoped, "rbac.yaml", ["ClusterRole"]))
    container = operator_container(chart_objects(values))
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": RELEASE, "namespace": NAMESPACE},
        "spec": {"template": {"spec": {"containers": [
            {"name": OPERATOR_CONTAINER, "args": container["args"]}]}}},
    }
    out[OVERLAY_NAMESPACED / "patch-deployment.yaml"] = _file(
        what + "; a patch that replaces the operator's arguments",
        [yaml.safe_dump(patch, sort_keys=False)])
    return out


#: Files this generator once wrote and no longer does: removed by ``write()``, and
#: ``stale()`` names them while they exist (Kopf peering is gone).
OBSOLETE = (BASE / "peering.yaml", BASE / "crds" / "kopf-peering.yaml")


def stale() -> list[Path]:
    """Generated files whose content on disk differs from a fresh generation."""
    changed = [path for path, text in generate().items()
               if not path.is_file() or path.read_text(encoding="utf-8") != text]
    return sorted(changed + [path for path in OBSOLETE if path.exists()])


def write() -> list[Path]:
    changed = stale()
    for path, text in generate().items():
        if path in changed:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for path in OBSOLETE:
        if path in changed:
            path.unlink()
    return changed


def main() -> int:
    changed = write()
    for path in changed:
        print(f"{'wrote' if path.exists() else 'removed'} {path.relative_to(ROOT)}")
    if not changed:
        print("generated files are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
