"""Reading MailTLSPolicy objects from YAML files and directories (offline commands).

Multi-document files, ``kind: List`` wrappers and whole directory trees are
read the way ``kubectl apply -f`` reads them; other kinds are ignored, so a
GitOps repository can be pointed at as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .crd import GROUP, KIND
from .safetext import one_line

YAML_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Source:
    """An object and the file it came from."""

    path: str
    obj: dict[str, Any]

    @property
    def ref(self) -> str:
        meta = self.obj.get("metadata") or {}
        return one_line(f"{meta.get('namespace') or 'default'}/{meta.get('name') or '?'}")


class SourceError(Exception):
    """A file that cannot be read or parsed."""


def _files(path: Path) -> Iterator[Path]:
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file() and child.suffix in YAML_SUFFIXES:
                yield child
    elif path.exists():
        yield path
    else:
        raise SourceError(f"{path}: no such file or directory")


def _is_policy(obj: Any) -> bool:
    return (isinstance(obj, dict) and obj.get("kind") == KIND
            and str(obj.get("apiVersion", "")).startswith(f"{GROUP}/"))


def _objects(doc: Any) -> Iterator[Any]:
    if isinstance(doc, dict) and str(doc.get("kind", "")).endswith("List") \
            and isinstance(doc.get("items"), list):
        yield from doc["items"]
    else:
        yield doc


def read_policies(paths: list[str]) -> list[Source]:
    """Every MailTLSPolicy in ``paths``, in file order; namespace defaults to ``default``."""
    out: list[Source] = []
    for top in paths:
        for file in _files(Path(top)):
            try:
                text = file.read_bytes().decode("utf-8")
                docs = list(yaml.safe_load_all(text))
            except UnicodeDecodeError as exc:
                raise SourceError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                                  ) from exc
            except yaml.YAMLError as exc:
                raise SourceError(f"{file}: invalid YAML: {exc}".replace("\n", " ")) from exc
            for doc in docs:
                for obj in _objects(doc):
                    if _is_policy(obj):
                        meta = obj.get("metadata")
                        if not isinstance(meta, dict):
                            meta = obj["metadata"] = {}
                        meta.setdefault("namespace", "default")
                        out.append(Source(str(file), obj))
    return out
