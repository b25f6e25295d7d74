"""Reading a set of ConfigMaps back into a table's text, the way a pod's loader does,
refusing an inconsistent set.  Pure."""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from .layout import ANN_REVISION, MANIFEST, Unreadable

# --------------------------------------------------------------------------- reading


def reassemble(bodies: Iterable[Mapping[str, Any]], table: str = "tls_policy") -> str:
    """A table's text from a set of ConfigMaps (primary and parts, any order), the way a
    pod's loader reads the mounted files: plain ``<table>``, or ``<table>.gz``, or the
    chunks named by the manifest ``<table>.gz.chunks``, concatenated in order, checked
    against its sha256, gunzipped.  ``""`` when the set has no such table.

    Raises :class:`Unreadable` when the set is inconsistent: objects of different
    revisions, a key in two objects, a missing chunk, a sha256 mismatch.
    """
    data: dict[str, str] = {}
    binary: dict[str, str] = {}
    revisions: dict[str, str] = {}
    for body in bodies:
        meta = body.get("metadata") or {}
        revisions[str(meta.get("name"))] = (meta.get("annotations") or {}).get(ANN_REVISION, "")
        for field, into in (("data", data), ("binaryData", binary)):
            for k, v in (body.get(field) or {}).items():
                if k in data or k in binary:
                    raise Unreadable(f"key {k} is in more than one ConfigMap")
                into[k] = v
    if len(set(revisions.values())) > 1:
        raise Unreadable(f"a half-updated set: revisions {sorted(revisions.items())}")
    try:
        if f"{table}{MANIFEST}" in data:
            return _join(table, data[f"{table}{MANIFEST}"], binary)
        if f"{table}.gz" in binary:
            return gzip.decompress(base64.b64decode(binary[f"{table}.gz"],
                                                    validate=True)).decode("utf-8")
    except (OSError, EOFError, binascii.Error, UnicodeDecodeError) as exc:
        raise Unreadable(f"{table}: {exc}") from exc
    return data.get(table, "")


def _join(table: str, manifest: str, binary: Mapping[str, str]) -> str:
    fields: dict[str, str] = {}
    for line in manifest.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    if not fields.get("chunks", "").isdigit():
        raise Unreadable(f"{table}{MANIFEST}: no chunk count")
    packed = bytearray()
    for index in range(int(fields["chunks"])):
        key = f"{table}.gz.{index:03d}"
        if key not in binary:
            raise Unreadable(f"{key} is missing")
        packed += base64.b64decode(binary[key], validate=True)
    got = hashlib.sha256(packed).hexdigest()
    if got != fields.get("sha256"):
        raise Unreadable(f"{table}: sha256 of the joined chunks is {got}, the manifest says "
                         f"{fields.get('sha256')}: parts of different revisions")
    return gzip.decompress(bytes(packed)).decode("utf-8")
