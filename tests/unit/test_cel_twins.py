"""The Python twins of the CRD's CEL rules give cel-python's verdict on every spec."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings

from mailtls_operator.crd import TWINS, cel_errors, iter_rule_texts, schema_errors

from .strategies import schema_valid_specs


def test_every_crd_rule_has_a_twin() -> None:
    missing = [rule for rule in iter_rule_texts() if rule not in TWINS]
    assert missing == []


def test_no_twin_is_left_without_a_rule() -> None:
    assert set(TWINS) == set(iter_rule_texts())


@settings(max_examples=400, deadline=None)
@given(schema_valid_specs())
def test_twins_agree_with_cel_python(spec: dict[str, Any]) -> None:
    assert schema_errors(spec) == []
    assert cel_errors(spec) == cel_errors(spec, oracle=True)
