"""Hypothesis strategies driven by a CRD's openAPIV3Schema: every property (optional ones
included), enums, bounds, patterns (RE2-checked), and the edge values of date-times and
integers the API server accepts.  A generator from the schema, so a field added to the
CRD is generated without editing a test."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import strategies as st

from mailtls_operator.crd import pattern_matches

INT64 = (-(2**63), 2**63 - 1)


@st.composite
def kube_datetimes(draw: st.DrawFn) -> str:
    """Times kube-openapi's ``format: date-time`` accepts, weighted to the edges: years
    0001 and 9999, the last seconds of 9999, offsets up to +-23:59 (and past: the schema
    does not check them), fractions of any length, lower-case ``t``/``z``."""
    year = draw(st.sampled_from([1, 2, 1970, 2026, 9998, 9999]) | st.integers(0, 9999))
    month = draw(st.sampled_from([1, 12]) | st.integers(1, 12))
    day = draw(st.sampled_from([1, 28, 31]) | st.integers(1, 31))
    if month in (4, 6, 9, 11):
        day = min(day, 30)
    if month == 2:
        day = min(day, 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28)
    hh, mm, ss = draw(st.sampled_from([(0, 0, 0), (23, 59, 59)]) | st.tuples(
        st.integers(0, 23), st.integers(0, 59), st.integers(0, 59)))
    frac = draw(st.sampled_from(["", ".0", ".999999", ".999999999", ".123456789012"])
                | st.text("0123456789", min_size=1, max_size=15).map(lambda d: "." + d))
    zone = draw(st.sampled_from(["Z", "z", "+00:00", "-00:00", "+23:59", "-23:59", "-01:00",
                                 "+99:99"])
                | st.tuples(st.sampled_from("+-"), st.integers(0, 23), st.integers(0, 59))
                .map(lambda t: f"{t[0]}{t[1]:02d}:{t[2]:02d}"))
    sep = draw(st.sampled_from(["T", "T", "t"]))
    return f"{year:04d}-{month:02d}-{day:02d}{sep}{hh:02d}:{mm:02d}:{ss:02d}{frac}{zone}"


def _string(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if node.get("format") == "date-time":
        return kube_datetimes()
    lo, hi = node.get("minLength", 0), min(node.get("maxLength", 40), 300)
    pattern = node.get("pattern")
    if pattern is None:
        return st.text(min_size=lo, max_size=hi)
    try:
        re.compile(pattern)
        base: st.SearchStrategy[str] = st.from_regex(pattern, fullmatch=True)
    except re.error:  # an RE2-only construct (\p{..}): any text, kept when RE2 agrees
        base = st.text(min_size=lo, max_size=hi)
    return base.filter(lambda s: lo <= len(s) <= node.get("maxLength", 10**9)
                       and pattern_matches(pattern, s))


def from_schema(node: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values ``node`` accepts (mostly: patterns are filtered, CEL rules are not applied)."""
    kind = node.get("type")
    if kind == "object":
        props = node.get("properties") or {}
        required = set(node.get("required", []))
        return st.fixed_dictionaries(
            {k: from_schema(v, depth + 1) for k, v in props.items() if k in required},
            optional={k: from_schema(v, depth + 1) for k, v in props.items()
                      if k not in required})
    if kind == "array":
        lo = node.get("minItems", 0)
        hi = min(node.get("maxItems", 5), lo + 4)
        items = from_schema(node.get("items", {}), depth + 1)
        unique = node.get("x-kubernetes-list-type") == "set"
        return st.lists(items, min_size=lo, max_size=hi, unique=unique)
    if kind == "string":
        return _string(node)
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        lo = node.get("minimum", INT64[0])
        hi = node.get("maximum", INT64[1])
        return st.sampled_from([lo, hi]) | st.integers(lo, hi)
    return st.none()


hostile_scalars = st.one_of(
    st.none(), st.booleans(), st.just(""), st.just(5000).map(lambda n: 10**n), st.just(-1),
    st.just(2**63),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.none(),
                                                         max_size=2))
hostile_metadata = st.one_of(
    hostile_scalars,
    st.fixed_dictionaries({}, optional={
        "name": st.sampled_from(["p", "a.b", "P", "p\n", "x" * 300]) | hostile_scalars,
        "namespace": st.sampled_from(["mail", "", "default", "Mail"]) | hostile_scalars,
        "generation": st.sampled_from([0, 1, 2**63 - 1]) | hostile_scalars,
        "creationTimestamp": kube_datetimes() | hostile_scalars,
        "uid": st.just("u") | hostile_scalars,
        "resourceVersion": st.just("1") | hostile_scalars,
    }))
