"""The one loader of the offline commands (``validate``, ``render``, ``explain``,
``probe``) and of the tests: paths -> the objects of our group, decoded and
checked as kubectl and the API server would, or one :class:`LoadError` line.

Layout: :mod:`.files` (which files, their bytes, bounded), :mod:`.decode`
(bytes -> JSON documents, bounded, strict), :mod:`.kinds` (the kinds and versions
the CRDs serve).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from .decode import MAX_ALIAS_NODES, MAX_DEPTH, MAX_NODES, DecodeError, clip, decode
from .files import MAX_FILE_BYTES, FileError, read_inputs, shown_path
from .kinds import KindError, check_kind, group_of, served

__all__ = [
    "MAX_ALIAS_NODES", "MAX_DEPTH", "MAX_FILE_BYTES", "MAX_NODES", "LoadError", "Loaded", "clip",
    "decode", "load_objects", "served", "shown_path",
]


class LoadError(Exception):
    """A path, file or document refused; ``str()`` is one line naming the file."""


@dataclass(frozen=True)
class Loaded:
    """An object of our group, its kind, and its file's name as shown in messages."""

    path: str
    kind: str
    obj: dict[str, Any]


def _objects(doc: Any) -> Iterator[Any]:
    """A document's objects: the items of a ``kind: ...List`` wrapper, else itself."""
    if isinstance(doc, dict) and isinstance(doc.get("kind"), str) \
            and doc["kind"].endswith("List") and isinstance(doc.get("items"), list):
        yield from doc["items"]
    else:
        yield doc


def load_objects(paths: list[str], stdin: BinaryIO | None = None) -> list[Loaded]:
    """Every object of our group in ``paths`` (files, directories, ``-``), in order.

    Objects of other groups and empty documents are skipped; an object of our group
    with a kind or version the CRDs do not serve is refused, like a file that cannot
    be read or decoded.  Raises :class:`LoadError`.
    """
    out: list[Loaded] = []
    try:
        for file in read_inputs(paths, stdin):
            try:
                docs = decode(file.data)
            except DecodeError as exc:
                raise LoadError(f"{file.name}: {exc}") from exc
            for i, doc in enumerate(docs):
                if group_of(doc) is not None:
                    try:
                        check_kind(doc)  # a List of our group: its version, then its items
                    except KindError as exc:
                        raise LoadError(f"{file.name}: document {i + 1}: {exc}") from exc
                for obj in _objects(doc):
                    if group_of(obj) is None:
                        continue
                    try:
                        kind = check_kind(obj)
                    except KindError as exc:
                        raise LoadError(f"{file.name}: document {i + 1}: {exc}") from exc
                    if kind in served().list_kinds:
                        continue  # a List of ours without items: nothing in it
                    out.append(Loaded(file.name, kind, obj))
    except FileError as exc:
        raise LoadError(str(exc)) from exc
    return out
