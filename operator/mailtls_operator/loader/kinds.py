"""Which ``apiVersion``/``kind`` pairs of our group exist: read from the CRD files.

The CRDs in ``crds/`` are the single source of truth: a version is served when
a CRD says ``served: true``, a kind is a CRD's ``names.kind`` (and its
``listKind``).  An object of our group that names anything else is refused, as
kubectl refuses it ("no matches for kind"); objects of other groups are not
ours to judge and are skipped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..crd import GROUP
from .decode import clip

_PACKAGED = ("crd.yaml", "discovery/crd.yaml")  # where the wheel puts crds/*.yaml


class KindError(ValueError):
    """An object of our group that the CRDs do not define."""


@dataclass(frozen=True)
class Served:
    """The kinds of our group and, per kind, the versions served."""

    versions: dict[str, frozenset[str]]
    list_kinds: dict[str, str]  # listKind -> kind


def _crd_files() -> list[Path]:
    root = resources.files("mailtls_operator")
    packaged = [Path(str(root.joinpath(p))) for p in _PACKAGED]
    if all(p.is_file() for p in packaged):
        return packaged
    return sorted((Path(__file__).resolve().parents[3] / "crds").glob("*.yaml"))


@functools.cache
def served() -> Served:
    """Read once from the CRD files."""
    versions: dict[str, frozenset[str]] = {}
    list_kinds: dict[str, str] = {}
    for path in _crd_files():
        crd: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
        spec = crd["spec"]
        if spec["group"] != GROUP:
            continue
        kind = spec["names"]["kind"]
        versions[kind] = frozenset(v["name"] for v in spec["versions"] if v.get("served"))
        list_kinds[spec["names"].get("listKind", f"{kind}List")] = kind
    return Served(versions, list_kinds)


def group_of(obj: Any) -> tuple[str, str] | None:
    """(group, version) when ``obj`` is a mapping whose ``apiVersion`` names our group,
    else None.  ``mailtls.io`` alone counts as ours (a version forgotten, not the core
    group): kubectl would find no such kind either way."""
    if not isinstance(obj, dict):
        return None
    api = obj.get("apiVersion")
    if not isinstance(api, str):
        return None
    group, slash, version = api.partition("/")
    if group == GROUP:
        return group, version if slash else ""
    return None


def check_kind(obj: dict[str, Any]) -> str:
    """The kind of an object of our group, or :class:`KindError` saying what is wrong."""
    api = obj["apiVersion"]
    _, _, version = api.partition("/")
    kind = obj.get("kind")
    table = served()
    if not isinstance(kind, str) or not kind:
        raise KindError(f"apiVersion {clip(api)}: kind is missing")
    if kind in table.list_kinds:
        kind_versions = table.versions[table.list_kinds[kind]]
    elif kind in table.versions:
        kind_versions = table.versions[kind]
    else:
        raise KindError(f"no matches for kind \"{clip(kind)}\" in group {GROUP} "
                        f"(kinds: {', '.join(sorted(table.versions))})")
    if version not in kind_versions:
        raise KindError(f"no matches for kind \"{clip(kind)}\" in version \"{clip(api)}\" "
                        f"(served: {', '.join(f'{GROUP}/{v}' for v in sorted(kind_versions))})")
    return kind
