"""Reading MailTLSPolicy objects from YAML/JSON files and directories (offline commands).

Multi-document files, ``kind: List`` wrappers and whole directory trees are
read the way ``kubectl apply -R -f`` reads them, through the one loader
(:mod:`mailtls_operator.loader`: strict decoding, bounds, kinds checked against
the CRDs); objects of other groups are ignored, so a GitOps repository can be
pointed at as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, BinaryIO

from .crd import KIND
from .loader import Loaded, LoadError, clip, load_objects


@dataclass(frozen=True)
class Source:
    """An object and the file it came from (the name as shown in messages: escaped)."""

    path: str
    obj: dict[str, Any]

    @property
    def ref(self) -> str:
        meta = self.obj.get("metadata") or {}
        return clip(f"{meta.get('namespace') or 'default'}/{meta.get('name') or '?'}")


class SourceError(Exception):
    """A path or file that cannot be read or parsed; the message is one line."""


def read_objects(paths: list[str], stdin: BinaryIO | None = None) -> list[Loaded]:
    """Every object of our group in ``paths``; ``metadata.namespace`` defaults to
    ``default`` (as kubectl's current context would give)."""
    try:
        loaded = load_objects(paths, stdin)
    except LoadError as exc:
        raise SourceError(str(exc)) from exc
    for item in loaded:
        meta = item.obj.get("metadata")
        if not isinstance(meta, dict):
            meta = item.obj["metadata"] = {}
        meta.setdefault("namespace", "default")
    return loaded


def read_policies(paths: list[str], stdin: BinaryIO | None = None) -> list[Source]:
    """Every MailTLSPolicy in ``paths``, in file order; namespace defaults to ``default``."""
    return [Source(item.path, item.obj) for item in read_objects(paths, stdin)
            if item.kind == KIND]
