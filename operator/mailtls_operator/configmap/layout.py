"""Names, labels and bodies of an instance's ConfigMaps: one object, or gzip chunks in
parts past the size limit.  Pure."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..render import Tables

SUFFIX = "-mailtls"
PART_INFIX = "-part-"
MANAGED_BY = "app.kubernetes.io/managed-by"
OPERATOR = "mailtls-operator"
LABEL_INSTANCE = "mailtls.io/instance"
LABEL_PART = "mailtls.io/part"
"""On part ConfigMaps only: their number, ``"1"`` ... ``"N"``."""
ANN_REVISION = "mailtls.io/revision"
ANN_PARTS = "mailtls.io/parts"
"""On a split primary only: how many part ConfigMaps the set has."""
TABLES = ("tls_policy", "transport")
ANN_SHA256 = {t: f"mailtls.io/{t.replace('_', '-')}-sha256" for t in TABLES}
"""On a split primary only, per chunked table: the sha256 of its whole gzip."""
OWNED_ANNOTATIONS = (ANN_REVISION, ANN_PARTS, *ANN_SHA256.values())
"""Annotations this module sets (or removes: absent from a wanted body means absent)."""

LIMIT = 1024 * 1024
"""The API server's limit on a ConfigMap."""
BODY_MAX = LIMIT - 16 * 1024
"""Most a body we write may take, as JSON: room for what the server adds
(uid, resourceVersion, timestamps, managedFields)."""
COMPRESS_ABOVE = 900 * 1024
"""A table text longer than this (bytes) is stored gzip-compressed."""
CHUNK = 700 * 1024
"""gzip bytes per chunk: ~933 KiB of base64, one chunk per part ConfigMap."""
MAX_PARTS = 64
"""Most part ConfigMaps one instance gets; beyond, :class:`TableTooLarge`."""
MAX_TABLE_BYTES = 64 * 1024 * 1024
"""Longest table text (UTF-8 bytes) the operator writes -- ~1.8 million destinations,
twice the largest measured (1,000,000 in 34.8 MB); a longer one is
:class:`TableTooLarge`.  The one bound writer and readers share: a reader inflates at
most this much per table (:func:`.reader.reassemble`), so a compressed bomb in a
ConfigMap costs it no more memory than the largest table we could have written."""
MAX_CHUNKS = 2 * MAX_PARTS
"""Most chunks a manifest may name (one per part for tls_policy, transport's share parts)."""
MANIFEST = ".gz.chunks"
"""Key suffix of a split table's manifest (``tls_policy.gz.chunks``)."""


class TableTooLarge(Exception):
    """Even compressed and split over :data:`MAX_PARTS` ConfigMaps, the tables do not fit."""


class Unreadable(ValueError):
    """:func:`reassemble`: the bodies do not make one consistent set."""


# ----------------------------------------------------------------------------- names


def configmap_name(instance: str) -> str:
    """The primary ConfigMap of an instance."""
    return f"{instance}{SUFFIX}"


def part_name(instance: str, number: int) -> str:
    """Part ConfigMap ``number`` (1-based) of an instance."""
    return f"{instance}{SUFFIX}{PART_INFIX}{number}"


def part_number(name: str, instance: str) -> int | None:
    """``n`` if ``name`` is part ConfigMap ``n`` of ``instance``, else None."""
    prefix = f"{instance}{SUFFIX}{PART_INFIX}"
    if not name.startswith(prefix):
        return None
    tail = name[len(prefix):]
    if not tail.isascii() or not tail.isdigit() or tail.startswith("0"):
        return None
    return int(tail)


def is_own_name(name: str, instance: str) -> bool:
    """Is ``name`` the primary or a part ConfigMap of ``instance``?"""
    return name == configmap_name(instance) or part_number(name, instance) is not None


# ---------------------------------------------------------------------------- bodies


def _size(body: Mapping[str, Any]) -> int:
    """Bytes of the body as JSON (UTF-8, no escaping of non-ASCII), as sent to the server."""
    return len(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def _entry_size(key: str, value: str) -> int:
    """What one more data/binaryData entry adds to :func:`_size`."""
    return _size({key: value}) - 1  # minus "{}", plus the ","


def _gzip(raw: bytes) -> bytes:
    return gzip.compress(raw, compresslevel=9, mtime=0)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _body(namespace: str, name: str, labels: dict[str, str], annotations: dict[str, str],
          data: dict[str, str], binary: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "data": data,
    }
    if binary:
        body["binaryData"] = binary
    return body


def _single(namespace: str, instance: str, tables: Tables,
            gz: dict[str, bytes]) -> dict[str, Any]:
    """Shapes 1 and 2: everything in the primary (it may not fit; the caller checks)."""
    data: dict[str, str] = {}
    binary: dict[str, str] = {}
    for table in TABLES:
        text = getattr(tables, table)
        if not text:
            continue
        raw = text.encode("utf-8")
        if len(raw) <= COMPRESS_ABOVE:
            data[table] = text
        else:
            gz[table] = _gzip(raw)
            binary[f"{table}.gz"] = _b64(gz[table])
    return _body(namespace, configmap_name(instance),
                 {MANAGED_BY: OPERATOR, LABEL_INSTANCE: instance},
                 {ANN_REVISION: tables.revision}, data, binary)


def _split(namespace: str, instance: str, tables: Tables,
           gz: dict[str, bytes]) -> list[dict[str, Any]]:
    """Shape 3: a primary with the manifests (and any plain table that fits) + parts."""
    labels = {MANAGED_BY: OPERATOR, LABEL_INSTANCE: instance}
    annotations = {ANN_REVISION: tables.revision, ANN_PARTS: str(MAX_PARTS)}
    data: dict[str, str] = {}
    chunked: list[tuple[str, bytes]] = []
    reserve = 16 * 1024  # the manifests (a line per chunk) and sha256 annotations, below
    room = BODY_MAX - _size(_body(namespace, configmap_name(instance), labels,
                                  annotations, {}, {})) - reserve
    for table in TABLES:
        text = getattr(tables, table)
        if not text:
            continue
        raw = text.encode("utf-8")
        cost = _entry_size(table, text)
        if len(raw) <= COMPRESS_ABOVE and cost <= room:
            data[table] = text
            room -= cost
        else:
            chunked.append((table, gz[table] if table in gz else _gzip(raw)))

    # Chunks, in order, packed into parts: a new part when the next chunk does not fit.
    part_labels = {**labels, LABEL_PART: str(MAX_PARTS)}
    part_room = BODY_MAX - _size(_body(namespace, part_name(instance, MAX_PARTS),
                                       part_labels, {ANN_REVISION: tables.revision},
                                       {}, {}))
    parts: list[dict[str, str]] = []
    left = 0
    locations: dict[str, list[str]] = {}
    for table, packed in chunked:
        locations[table] = []
        for index, start in enumerate(range(0, len(packed), CHUNK)):
            key, value = f"{table}.gz.{index:03d}", _b64(packed[start:start + CHUNK])
            cost = _entry_size(key, value)
            if not parts or cost > left:
                parts.append({})
                left = part_room
            parts[-1][key] = value
            left -= cost
            locations[table].append(f"chunk: {index:03d} {part_name(instance, len(parts))}")
        data[f"{table}{MANIFEST}"] = "".join(
            line + "\n" for line in (f"chunks: {len(locations[table])}",
                                     f"size: {len(packed)}",
                                     f"sha256: {hashlib.sha256(packed).hexdigest()}",
                                     *locations[table]))
        annotations[ANN_SHA256[table]] = hashlib.sha256(packed).hexdigest()
    if len(parts) > MAX_PARTS:
        total = sum(len(packed) for _, packed in chunked)
        raise TableTooLarge(
            f"{namespace}/{instance}: the tables are {total} bytes even gzip-compressed and "
            f"would need {len(parts)} part ConfigMaps of ~{CHUNK // 1024} KiB; at most "
            f"{MAX_PARTS} are written. Split the destinations over more Postfix instances "
            "(spec.instances) or use wildcard keys (.example.com)")
    annotations[ANN_PARTS] = str(len(parts))
    primary = _body(namespace, configmap_name(instance), labels, annotations, data, {})
    out = [primary]
    for number, chunks in enumerate(parts, start=1):
        out.append(_body(namespace, part_name(instance, number),
                         {**labels, LABEL_PART: str(number)},
                         {ANN_REVISION: tables.revision}, {}, chunks))
    for body in out:  # by construction; a break here is a bug, not a big table
        if _size(body) > BODY_MAX:
            raise RuntimeError(f"{body['metadata']['name']}: {_size(body)} bytes as JSON, "
                               f"over {BODY_MAX}")
    return out


_CACHE: OrderedDict[tuple[str, str, str, int, int, int, int], tuple[dict[str, Any], ...]] = \
    OrderedDict()
_CACHE_SIZE = 4
_CACHE_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget remembered bodies (tests that change CHUNK or MAX_PARTS)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _copy(body: Mapping[str, Any]) -> dict[str, Any]:
    """A fresh body (the strings are shared: immutable)."""
    return {k: (_copy(v) if isinstance(v, Mapping) else v) for k, v in body.items()}


def configmap_bodies(namespace: str, instance: str, tables: Tables) -> list[dict[str, Any]]:
    """The wanted ConfigMaps of an instance: the primary first, then the parts in order
    (none unless the tables are too large for one ConfigMap even compressed).

    Deterministic: the same tables give byte-identical bodies.  Compressing a large
    table takes a while (~2 s for 33 MiB), so the result for the last few large
    revisions is remembered; each call still returns fresh dicts.

    Raises :class:`TableTooLarge` past :data:`MAX_PARTS` parts or a table text past
    :data:`MAX_TABLE_BYTES`.
    """
    key = (namespace, instance, tables.revision, len(tables.tls_policy),
           hash(tables.tls_policy), len(tables.transport), hash(tables.transport))
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
    if hit is None:
        for table in TABLES:
            size = len(getattr(tables, table).encode("utf-8"))
            if size > MAX_TABLE_BYTES:
                raise TableTooLarge(
                    f"{namespace}/{instance}: the {table} table is {size} bytes, more than "
                    f"the {MAX_TABLE_BYTES} a Postfix pod's loader accepts. Split the "
                    "destinations over more Postfix instances")
        gz: dict[str, bytes] = {}
        primary = _single(namespace, instance, tables, gz)
        bodies: tuple[dict[str, Any], ...] = (primary,) if _size(primary) <= BODY_MAX else tuple(
            _split(namespace, instance, tables, gz))
        if not gz:  # small: cheaper to rebuild than to remember
            return [_copy(b) for b in bodies]
        with _CACHE_LOCK:
            _CACHE[key] = hit = bodies
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return [_copy(b) for b in hit]


def configmap_body(namespace: str, instance: str, tables: Tables) -> dict[str, Any]:
    """The wanted primary ConfigMap (``configmap_bodies(...)[0]``).

    Kept for callers that handle one object; when the tables are split it holds only
    the manifests, so writers must use :func:`configmap_bodies`.
    """
    return configmap_bodies(namespace, instance, tables)[0]


def stale_parts(existing_names: Iterable[str],
                wanted_bodies: Sequence[Mapping[str, Any]]) -> list[str]:
    """Part ConfigMaps among ``existing_names`` that the wanted set no longer has (after
    the tables shrank), in part order: delete them once the primary is written.

    The instance is the wanted primary's (``wanted_bodies[0]``); names that are not
    parts of that instance (its primary, other instances, anything else) are never
    named.  To delete every part (retiring the instance) pass
    ``[n for n in names if part_number(n, instance)]`` directly.
    """
    if not wanted_bodies:
        raise ValueError("stale_parts needs the wanted primary (wanted_bodies[0])")
    instance = wanted_bodies[0]["metadata"]["labels"][LABEL_INSTANCE]
    wanted = {b["metadata"]["name"] for b in wanted_bodies}
    numbered = [(n, name) for name in set(existing_names)
                if (n := part_number(name, instance)) is not None and name not in wanted]
    return [name for _, name in sorted(numbered)]


# ---------------------------------------------------------------------------- compare


def same_content(current: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> bool:
    """Is what is stored exactly what we want: content, our annotations (present or
    absent alike), our labels?  Works for the primary and for each part."""
    if current is None:
        return False
    meta = current.get("metadata") or {}
    want_meta = wanted["metadata"]
    have_ann = meta.get("annotations") or {}
    want_ann = want_meta.get("annotations") or {}
    return (
        all(have_ann.get(k) == want_ann.get(k) for k in OWNED_ANNOTATIONS)
        and all((meta.get("labels") or {}).get(k) == v for k, v in want_meta["labels"].items())
        and (current.get("data") or {}) == (wanted.get("data") or {})
        and (current.get("binaryData") or {}) == (wanted.get("binaryData") or {})
    )


def merge_patch(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning ``current`` into ``wanted``: keys of ``data`` and
    ``binaryData`` and our annotations that are no longer wanted are nulled (e.g. a
    primary that was split and no longer is loses ``mailtls.io/parts``)."""
    meta = current.get("metadata") or {}
    patch = _copy(wanted)
    annotations = patch["metadata"].setdefault("annotations", {})
    for k in OWNED_ANNOTATIONS:
        if k in (meta.get("annotations") or {}) and k not in annotations:
            annotations[k] = None
    for field in ("data", "binaryData"):
        patch[field] = {**{k: None for k in current.get(field) or {}},
                        **(wanted.get(field) or {})}
    return patch
