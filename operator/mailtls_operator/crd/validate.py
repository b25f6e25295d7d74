"""What the API server would refuse: the schema, then (only on a spec that passed it) CEL."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from .cel import cel_errors, cel_rules
from .schema import schema_errors
from .source import FieldError

ROOT_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})


def prune_nulls(value: Any) -> Any:
    """``value`` without the object fields that are null, as the API server stores it.

    The server prunes a null field whose schema is not ``nullable`` (none of ours is)
    before it validates, so ``match: null`` is no ``match`` at all and ``spec: null``
    is a missing spec; list items are not fields and are kept (a null item is refused
    by its type).  Shown by the differential test against a real kube-apiserver.
    """
    if isinstance(value, Mapping):
        return {k: prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [prune_nulls(v) if isinstance(v, Mapping) else v for v in value]
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
    errors = unknown + schema_errors(spec)
    if errors:
        return errors
    return cel_errors(spec, oracle=oracle)


def status_errors(status: Any) -> list[FieldError]:
    """What the API server refuses in a ``/status`` write: the status schema (its
    enums, lengths, formats and the conditions' list-map keys)."""
    return schema_errors(status, "status")


def iter_rule_texts() -> Iterator[str]:
    """Rule texts, for tests that check every rule has a twin."""
    return (r.rule for r in cel_rules())
