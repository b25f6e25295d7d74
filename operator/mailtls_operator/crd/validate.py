"""What the API server would refuse: the schema, then (only on a spec that passed it) CEL."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from .cel import cel_errors, cel_rules
from .schema import schema_errors
from .source import FieldError


def validate_with_crd(obj: Mapping[str, Any], *, oracle: bool = False) -> list[FieldError]:
    """What the API server would refuse in a MailTLSPolicy object: schema, then CEL.

    As on a real API server, CEL rules run only on a spec that passed the schema.
    """
    spec = obj.get("spec")
    if spec is None:
        return [FieldError("spec", "Required value")]
    errors = schema_errors(spec)
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
