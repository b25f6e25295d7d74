"""Reading a set of ConfigMaps back into a table's text, the way a pod's loader does,
refusing an inconsistent set.  Pure."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

from .layout import ANN_REVISION, MANIFEST, MAX_CHUNKS, MAX_TABLE_BYTES, Unreadable

# --------------------------------------------------------------------------- reading


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    """``value`` as a mapping of strings to strings (absent/null is empty); else Unreadable."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise Unreadable(f"{where} is {type(value).__name__}, not an object")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise Unreadable(f"{where}: an entry is not string: string")
    return value


def reassemble(bodies: Iterable[Any], table: str = "tls_policy") -> str:
    """A table's text from a set of ConfigMaps (primary and parts, any order), the way a
    pod's loader reads the mounted files: plain ``<table>``, or ``<table>.gz``, or the
    chunks named by the manifest ``<table>.gz.chunks``, concatenated in order, checked
    against its sha256, gunzipped.  ``""`` when the set has no such table.

    Raises :class:`Unreadable` (and nothing else, whatever the bodies hold) when the
    set is inconsistent or corrupt: objects of different revisions, a key in two
    objects, a missing chunk, a sha256 mismatch, wrong types, bad base64 or gzip, or a
    table that would inflate past :data:`.layout.MAX_TABLE_BYTES` -- refused before
    more than that is inflated.
    """
    data: dict[str, str] = {}
    binary: dict[str, str] = {}
    revisions: dict[str, str] = {}
    for number, body in enumerate(bodies):
        if not isinstance(body, Mapping):
            raise Unreadable(f"ConfigMap #{number} is {type(body).__name__}, not an object")
        meta = body.get("metadata") or {}
        if not isinstance(meta, Mapping):
            raise Unreadable(f"metadata is {type(meta).__name__}, not an object")
        annotations = _mapping(meta.get("annotations"), "metadata.annotations")
        name = meta.get("name")
        revisions[name if isinstance(name, str) else f"#{number}"] = annotations.get(
            ANN_REVISION, "")
        for field, into in (("data", data), ("binaryData", binary)):
            for k, v in _mapping(body.get(field), field).items():
                if k in data or k in binary:
                    raise Unreadable(f"key {k[:80]!r} is in more than one ConfigMap")
                into[k] = v
    if len(set(revisions.values())) > 1:
        raise Unreadable(f"a half-updated set: revisions {sorted(revisions.items())}"[:500])
    try:
        if f"{table}{MANIFEST}" in data:
            return _inflate(table, _join(table, data[f"{table}{MANIFEST}"], binary))
        if f"{table}.gz" in binary:
            return _inflate(table, base64.b64decode(binary[f"{table}.gz"], validate=True))
    except (binascii.Error, ValueError) as exc:
        raise Unreadable(f"{table}: {exc}") from exc
    return data.get(table, "")


def _inflate(table: str, packed: bytes) -> str:
    """gunzip ``packed`` into at most :data:`MAX_TABLE_BYTES` bytes of UTF-8 text: a
    stream decompressor asked for one byte more than the bound, so a bomb is refused
    after inflating the bound, not its claimed size."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing only
    try:
        raw = inflater.decompress(packed, MAX_TABLE_BYTES + 1)
    except zlib.error as exc:
        raise Unreadable(f"{table}: not gzip data or corrupt ({exc})") from None
    if len(raw) > MAX_TABLE_BYTES:
        raise Unreadable(f"{table}: inflates past {MAX_TABLE_BYTES} bytes, more than the "
                         "operator ever writes")
    if not inflater.eof:
        raise Unreadable(f"{table}: the gzip stream is truncated")
    if inflater.unused_data:
        raise Unreadable(f"{table}: data after the gzip stream")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Unreadable(f"{table}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


_COUNT = re.compile(r"[0-9]{1,4}")


def _join(table: str, manifest: str, binary: Mapping[str, str]) -> bytes:
    fields: dict[str, str] = {}
    for line in manifest.splitlines()[:MAX_CHUNKS + 8]:
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    count = fields.get("chunks", "")
    if not _COUNT.fullmatch(count) or not 1 <= int(count) <= MAX_CHUNKS:
        raise Unreadable(f"{table}{MANIFEST}: no chunk count of 1..{MAX_CHUNKS}")
    packed = bytearray()
    for index in range(int(count)):
        key = f"{table}.gz.{index:03d}"
        if key not in binary:
            raise Unreadable(f"{key} is missing")
        packed += base64.b64decode(binary[key], validate=True)
    got = hashlib.sha256(packed).hexdigest()
    if got != fields.get("sha256"):
        raise Unreadable(f"{table}: sha256 of the joined chunks is {got}, the manifest says "
                         f"{fields.get('sha256', '')[:64]}: parts of different revisions")
    return bytes(packed)
