"""No value can smuggle a line, an entry or an attribute into a table, and none crashes.

Every string field of the spec (found by walking the CRD, so a new field is covered
or this test fails) gets control, format and separator characters at its start, end
or middle.  ``mailtls validate`` and ``mailtls render`` must refuse each with exit 2,
nothing on stdout and exactly one ``file: ns/name: field: reason`` line -- never a
traceback, never a line in the table.  The CRD's patterns are judged with RE2, as the
API server judges them (Go's ``regexp``: ``$`` does not match before a final newline).
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import re2
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mailtls_operator import cli, crd
from mailtls_operator.loader import decode
from mailtls_operator.policy import Policy
from mailtls_operator.render import render

NOW = "2026-06-01T00:00:00Z"
BASE: dict[str, Any] = {
    "destinations": ["example.com"], "level": "secure", "match": ["nexthop"],
    "ciphers": "high", "protocols": ">=TLSv1.2", "exclude": ["3DES"],
    "tafile": ["/etc/ssl/ca.pem"], "servername": "hostname", "connectionReuse": True,
    "route": "direct", "instances": ["relay"], "mode": "enforce",
    "exception": {"startsAt": NOW, "expiresAt": "2026-06-02T00:00:00Z",
                  "reason": "INC-1 partner certificate expired"},
}
FINGERPRINT: dict[str, Any] = {
    "destinations": ["example.com"], "level": "fingerprint",
    "match": [":".join(["3D"] * 32)], "matchKind": "publicKey", "enableRPK": True,
}
FINGERPRINT_FIELDS = {"spec.matchKind"}
"""String fields valid only with level fingerprint: their base value is in FINGERPRINT."""
HOSTILE = ["\n", "\r", "\r\n", "\t", "\x00", "\x0b", "\x0c", "\x1b", "\x7f", "\x85", "\u2028",
           "\u2029", "\u200b", "\u200e", "\u202e", "\u2066", "\ufeff", "\u00ad", "\u00a0",
           "\u3000", " ", "\U000e0001"]
SEPARATORS = {" ", "\u00a0", "\u3000"}  # prose may hold these inside (exception.reason)


def _string_fields(node: dict[str, Any], path: str) -> Iterator[str]:
    if node.get("type") == "string":
        yield path
    elif node.get("type") == "array" and node.get("items", {}).get("type") == "string":
        yield f"{path}[0]"
    for name, sub in (node.get("properties") or {}).items():
        yield from _string_fields(sub, f"{path}.{name}")


STRING_FIELDS = sorted(_string_fields(crd.version_schema()["properties"]["spec"], "spec"))


def _get(spec: dict[str, Any], field: str) -> tuple[Any, str | int]:
    parts = [p for p in re.split(r"\.|\[(\d+)\]", field.removeprefix("spec.")) if p]
    target: Any = spec
    for part in parts[:-1]:
        target = target[int(part)] if part.isdigit() else target[part]
    last = parts[-1]
    return target, int(last) if last.isdigit() else last


def test_every_string_field_of_the_crd_has_a_valid_base_value() -> None:
    for field in STRING_FIELDS:
        base = FINGERPRINT if field in FINGERPRINT_FIELDS else BASE
        target, key = _get(copy.deepcopy(base), field)
        assert isinstance(target[key], str), field
    assert _run(BASE, "validate")[0] == 0
    assert _run(FINGERPRINT, "validate")[0] == 0


def _run(spec: dict[str, Any], command: str) -> tuple[int, str, str, str]:
    obj = {"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy",
           "metadata": {"name": "hostile", "namespace": "mail"}, "spec": spec}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "policy.yaml"
        path.write_text(yaml.safe_dump(obj, allow_unicode=False), encoding="utf-8")
        assert decode(path.read_bytes()) == [obj]  # nothing lost on disk (the CLI's loader)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([command, "-f", str(path), "--now", NOW])
        return code, out.getvalue(), err.getvalue(), str(path)


@st.composite
def hostile_specs(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    field = draw(st.sampled_from([*STRING_FIELDS, "fingerprint"]))
    spec = copy.deepcopy(FINGERPRINT if field == "fingerprint" or field in FINGERPRINT_FIELDS
                         else BASE)
    field = "spec.match[0]" if field == "fingerprint" else field
    char = draw(st.sampled_from(HOSTILE))
    where = draw(st.sampled_from(["start", "end", "middle"]))
    if field == "spec.exception.reason" and char in SEPARATORS:
        where = draw(st.sampled_from(["start", "end"]))
    target, key = _get(spec, field)
    value = target[key]
    middle = len(value) // 2
    target[key] = {"start": char + value, "end": value + char,
                   "middle": value[:middle] + char + value[middle:]}[where]
    return spec, field


@settings(max_examples=400, deadline=None)
@given(hostile_specs(), st.sampled_from(["validate", "render"]))
def test_a_hostile_character_in_any_field_is_refused_on_one_line(
        case: tuple[dict[str, Any], str], command: str) -> None:
    spec, field = case
    code, out, err, path = _run(spec, command)
    assert code == 2, (spec, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith(f"{path}: mail/hostile: {field}: "), (lines, field)
    assert "Traceback" not in err


def test_the_newline_that_pythons_dollar_let_through_is_refused() -> None:
    """The hole this closes: Python's ``$`` matches before a final newline, RE2's does not."""
    pattern = crd.version_schema()["properties"]["spec"]["properties"]["match"]["items"][
        "pattern"]
    assert re.search(pattern, "nexthop\n") is not None  # Python would have accepted it
    assert re2.search(pattern, "nexthop\n") is None
    spec = {**BASE, "exclude": ["3DES\nexample.net none"]}
    code, out, err, _ = _run(spec, "render")
    assert (code, out) == (2, "") and "spec.exclude[0]" in err


def _patterns(node: dict[str, Any], path: str) -> Iterator[tuple[str, str]]:
    if "pattern" in node:
        yield path, node["pattern"]
    if node.get("type") == "array":
        yield from _patterns(node["items"], f"{path}[0]")
    for name, sub in (node.get("properties") or {}).items():
        yield from _patterns(sub, f"{path}.{name}")


PATTERNS = sorted(_patterns(crd.version_schema()["properties"]["spec"], "spec"))


def test_every_crd_pattern_compiles_in_re2_and_is_checked() -> None:
    assert {f for f, _ in PATTERNS} >= {"spec.destinations[0]", "spec.match[0]",
                                        "spec.protocols", "spec.exclude[0]", "spec.tafile[0]",
                                        "spec.servername", "spec.instances[0]",
                                        "spec.exception.reason"}
    for _, pattern in PATTERNS:
        re2.compile(pattern)


@st.composite
def pattern_probes(draw: st.DrawFn) -> tuple[str, str, str]:
    field, pattern = draw(st.sampled_from(PATTERNS))
    target, key = _get(copy.deepcopy(BASE), field)
    seed = target[key]
    text = draw(st.one_of(
        st.text(max_size=12),
        st.text(alphabet=st.sampled_from([*seed, *"".join(HOSTILE), "#", "=", ":", "$", "."]),
                max_size=20),
        st.sampled_from(HOSTILE).map(lambda c: seed + c),
        st.sampled_from(HOSTILE).map(lambda c: c + seed),
    ))
    return field, pattern, text


@settings(max_examples=600, deadline=None)
@given(pattern_probes())
def test_the_validator_and_re2_agree_on_every_crd_pattern(probe: tuple[str, str, str]) -> None:
    field, pattern, text = probe
    if not text:
        return  # minLength, not pattern, refuses the empty string
    spec = copy.deepcopy(BASE)
    target, key = _get(spec, field)
    target[key] = text
    refused = any(e.field == field and "must match" in e.message
                  for e in crd.schema_errors(spec))
    assert refused == (re2.search(pattern, text) is None), (field, text)


@pytest.mark.parametrize(("keys", "value"), [
    (("example.com\nevil.example",), "none"),
    (("example.com",), "secure match=a\nevil.example none"),
    (("example.com",), "secure  match=a"),
    (("example.com",), "secure match=a\u2028x"),
    (("#example.com",), "secure"),
    (("example.com",), "bogus"),
])
def test_the_renderer_writes_no_unsafe_entry_whatever_the_validator_said(
        keys: tuple[str, ...], value: str) -> None:
    bad = Policy(namespace="mail", name="bad", level=value.split(" ")[0], keys=keys, value=value)
    good = Policy(namespace="mail", name="good", level="encrypt", keys=("b.example",),
                  value="encrypt")
    tables = render([bad, good])
    assert list(tables.refused) == ["mail/bad"]
    assert tables.tls_entries.keys() - {"mailtls-revision.invalid"} == {"b.example"}
    body = [ln for ln in tables.tls_policy.splitlines() if not ln.startswith("#")]
    assert len(body) == 2 and "evil" not in tables.tls_policy
