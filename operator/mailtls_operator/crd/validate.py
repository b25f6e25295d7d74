"""What the API server would refuse: the schema, then (only on a spec that passed it) CEL."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from .cel import cel_errors, cel_rules
from .schema import schema_errors
from .source import FieldError

ROOT_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})


def prune_nulls(value: Any, depth: int = 0) -> Any:
    """``value`` without the object fields that are null, as the API server stores it.

    The server prunes a null field whose schema is not ``nullable`` (none of ours is)
    before it validates, so ``match: null`` is no ``match`` at all and ``spec: null``
    is a missing spec; list items are not fields and are kept (a null item is refused
    by its type).  Shown by the differential test against a real kube-apiserver.
    Below :data:`MAX_DEPTH` nothing is pruned: :func:`json_errors` refuses such nesting.
    """
    if depth > MAX_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {k: prune_nulls(v, depth + 1) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [prune_nulls(v, depth + 1) if isinstance(v, Mapping) else v for v in value]
    return value


def root_errors(obj: Mapping[str, Any]) -> list[FieldError]:
    """Fields at the top of the object that no CRD of ours declares: kubectl's strict
    field validation makes the server refuse them (``unknown field "Spec"``)."""
    return [FieldError(str(k), f'unknown field "{k}"') for k in obj if k not in ROOT_FIELDS]


def validate_with_crd(obj: Mapping[str, Any], *, oracle: bool = False) -> list[FieldError]:
    """What the API server would refuse in a MailTLSPolicy object: schema, then CEL.

    As on a real API server, null fields are pruned first and CEL rules run only on a
    spec that passed the schema.
    """
    obj = prune_nulls(obj)
    unknown = root_errors(obj)
    spec = obj.get("spec")
    if spec is None:
        return [*unknown, FieldError("spec", "Required value")]
    errors = json_errors(spec, "spec")
    if errors:
        return unknown + errors
    errors = unknown + schema_errors(spec)
    if errors:
        return errors
    return cel_errors(spec, oracle=oracle)


MAX_DEPTH = 64
_INT64 = (-(2**63), 2**63 - 1)


def json_errors(value: Any, where: str, depth: int = 0) -> list[FieldError]:
    """Values no JSON the API server decodes can hold, found before the schema walk
    (whose messages ``repr`` the value: a 5,000-digit integer cannot be repr'd): an
    integer outside int64, NaN or an infinity, a non-string key, a non-JSON type, nesting
    past :data:`MAX_DEPTH`.  The first few, each naming its field."""
    if depth > MAX_DEPTH:
        return [FieldError(where, f"Invalid value: nested more than {MAX_DEPTH} deep")]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            return [FieldError(where, f"Invalid value: a {value.bit_length()}-bit integer, "
                                      "outside int64")]
        return []
    if isinstance(value, float):
        return [] if math.isfinite(value) else [
            FieldError(where, "Invalid value: NaN and infinities are not JSON numbers")]
    if isinstance(value, Mapping):
        out: list[FieldError] = []
        for key, item in value.items():
            if not isinstance(key, str):
                out.append(FieldError(where, f"Invalid value: a {type(key).__name__} key; "
                                             "JSON object keys are strings"))
            else:
                out += json_errors(item, f"{where}.{key}", depth + 1)
            if len(out) >= 5:
                break
        return out
    if isinstance(value, list | tuple):
        out = []
        for index, item in enumerate(value):
            out += json_errors(item, f"{where}[{index}]", depth + 1)
            if len(out) >= 5:
                break
        return out
    return [FieldError(where, f"Invalid value: a {type(value).__name__} is not a JSON value")]


def status_errors(status: Any) -> list[FieldError]:
    """What the API server refuses in a ``/status`` write: the status schema (its
    enums, lengths, formats and the conditions' list-map keys)."""
    return schema_errors(status, "status")


def iter_rule_texts() -> Iterator[str]:
    """Rule texts, for tests that check every rule has a twin."""
    return (r.rule for r in cel_rules())
