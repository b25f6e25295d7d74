"""An object's ``metadata`` as the API server would hold it: refused field by field, or
normalised -- never a traceback on a null, a garbage time or a 5,000-digit integer.

Normalisations (documented in docs/architecture.md's model section):

- ``namespace`` absent, ``null`` or ``""`` is *unset*: kubectl then uses the
  context's namespace, offline that is ``default`` -- so ``namespace: ""`` and no
  namespace are the same object, ``default/<name>``;
- ``generation`` absent or ``null`` is 0; ``creationTimestamp`` absent or ``null`` is
  the epoch (the oldest: a policy written before the API server saw it).

Anything else of the wrong type or out of range is a :class:`FieldError` naming the
field.  The API server only ever sends a string name and namespace, an int64
generation >= 0 and an RFC 3339 ``creationTimestamp``; these rules matter for
objects read from files and for anything that did not come from a real server.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .source import FieldError
from .timefmt import parse_rfc3339

DEFAULT_NAMESPACE = "default"
INT64_MAX = 2**63 - 1
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def metadata_of(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """``obj["metadata"]`` when it is a mapping, else ``{}`` (:func:`meta_errors` says why)."""
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def namespace_of(meta: Mapping[str, Any]) -> str:
    """The namespace, unset (absent, null, "") meaning ``default``; a non-string is shown
    by its type (the object is refused by :func:`meta_errors` anyway)."""
    value = meta.get("namespace")
    if value is None or value == "":
        return DEFAULT_NAMESPACE
    return value if isinstance(value, str) else f"<{type(value).__name__}>"


def name_of(meta: Mapping[str, Any]) -> str:
    value = meta.get("name")
    return value if isinstance(value, str) and value else "?"


def generation_of(meta: Mapping[str, Any]) -> int:
    """``metadata.generation`` when it is an int64 >= 0, else 0."""
    value: Any = meta.get("generation")
    return int(value) if _is_generation(value) else 0


def created_of(meta: Mapping[str, Any]) -> datetime:
    """``metadata.creationTimestamp`` as an aware UTC time; the epoch when unset or invalid."""
    value = meta.get("creationTimestamp")
    if isinstance(value, str):
        try:
            return parse_rfc3339(value)
        except ValueError:
            pass
    return EPOCH


def _is_generation(value: Any) -> bool:
    return type(value) is int and 0 <= value <= INT64_MAX


def shown(text: str) -> str:
    """Quoted, every non-ASCII or control character escaped: one safe line."""
    return json.dumps(text, ensure_ascii=True)


def _type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)


def meta_errors(obj: Mapping[str, Any], *, name_required: bool = True) -> list[FieldError]:
    """Every reason the API server (or kubectl's strict decoding) would refuse the
    object's metadata: names it could not hold (RFC 1123), so an offline check never
    prints a name that could not exist, nor one with a newline in it; a generation that
    is not an int64 >= 0; a creationTimestamp that is not an RFC 3339 time."""
    raw = obj.get("metadata")
    if raw is not None and not isinstance(raw, Mapping):
        return [FieldError("metadata", f"Invalid value: must be of type object, not {_type(raw)}")]
    meta: Mapping[str, Any] = raw or {}
    out: list[FieldError] = []
    name = meta.get("name")
    if name_required and (name is None or name == ""):
        out.append(FieldError("metadata.name", "Required value"))
    for attr, pattern, limit in (("name", _SUBDOMAIN, 253), ("namespace", _LABEL, 63)):
        value = meta.get(attr)
        if value is None or value == "":
            continue
        kind = "subdomain" if limit == 253 else "label"
        if not isinstance(value, str):
            out.append(FieldError(f"metadata.{attr}",
                                  f"Invalid value: must be of type string, not {_type(value)}"))
        elif len(value) > limit or not pattern.fullmatch(value):
            out.append(FieldError(f"metadata.{attr}", f"Invalid value: {shown(value[:300])}: "
                                  f"must be a lowercase RFC 1123 {kind} of at most {limit} "
                                  "characters"))
    generation = meta.get("generation")
    if generation is not None and not _is_generation(generation):
        why = (f"{generation.bit_length()}-bit integer, out of int64 range"
               if type(generation) is int else f"must be an integer, not {_type(generation)}")
        out.append(FieldError("metadata.generation", f"Invalid value: {why}"))
    created = meta.get("creationTimestamp")
    if created is not None:
        if not isinstance(created, str):
            out.append(FieldError("metadata.creationTimestamp",
                                  f"Invalid value: must be a string, not {_type(created)}"))
        else:
            try:
                parse_rfc3339(created)
            except ValueError as exc:
                out.append(FieldError("metadata.creationTimestamp",
                                      f"Invalid value: {shown(created[:80])}: {exc}"))
    uid = meta.get("uid")
    if uid is not None and not isinstance(uid, str):
        out.append(FieldError("metadata.uid",
                              f"Invalid value: must be of type string, not {_type(uid)}"))
    return out
