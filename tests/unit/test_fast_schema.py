"""The compiled schema check (fastjsonschema, RE2 patterns) says "valid" exactly when
jsonschema's detailed walk finds no error: the fast path may never accept what the API
server refuses, nor refuse what it accepts."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mailtls_operator import crd
from mailtls_operator.crd import schema
from tests.unit.strategies import schema_valid_specs, specs

junk = st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(),
                                                                          max_size=2),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """A spec, then some of: a field of the wrong type, a removed required field, an
    unknown field, a duplicated list item, an over-long list, an exception object."""
    spec: dict[str, Any] = draw(specs() | schema_valid_specs())
    if draw(st.booleans()):
        spec[draw(st.sampled_from([*spec, "bogus"]))] = draw(junk)
    if draw(st.booleans()):
        spec.pop(draw(st.sampled_from(sorted(spec))), None)
    lists = [k for k, v in spec.items() if isinstance(v, list) and v]
    if draw(st.booleans()) and lists:
        key = draw(st.sampled_from(lists))
        spec[key] = [*spec[key], spec[key][0]]
    if draw(st.booleans()):
        spec["exception"] = draw(st.fixed_dictionaries(
            {"startsAt": st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01", "x"]),
             "expiresAt": st.sampled_from(["2026-01-02T00:00:00+01:00", "tomorrow"]),
             "reason": st.text(max_size=8)}))
    return spec


@settings(max_examples=800, deadline=None)
@given(mutated())
def test_the_compiled_check_agrees_with_the_detailed_walk(spec: dict[str, Any]) -> None:
    assert crd.schema_valid(spec) == (crd.detailed_schema_errors(spec) == []), spec


def test_the_spec_schema_is_compiled_and_the_status_schema_falls_back() -> None:
    assert schema._fast_validator("spec") is not None
    assert schema._fast_validator("status") is None  # list-type map: jsonschema alone
