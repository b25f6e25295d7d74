"""The loader's decoding (issue 22, items 4 and 6, and the document bounds of 7): what
kubectl decodes is decoded to the same JSON value, what it refuses (or what would
explode) is refused with one line naming the line, column and problem."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mailtls_operator.loader import MAX_ALIAS_NODES, MAX_DEPTH, MAX_NODES, clip, decode
from mailtls_operator.loader.decode import DecodeError
from mailtls_operator.loader.files import FileError, read_inputs
from mailtls_operator.safetext import unsafe_character

# YAML 1.1 folds NEL, LS and PS as line breaks in plain scalars (PyYAML's emitter writes
# them unquoted): kubectl's YAML 1.1 does the same, so they are left out of the texts.
CHARS = st.characters(codec="utf-8",
                      exclude_characters="\x85\u2028\u2029")
# PyYAML's emitter writes the strings y/Y/n/N unquoted, but they are booleans to kubectl's
# go-yaml and so to the loader (test_single_letter_booleans_are_read_as_kubectl_reads_them).
GO_YAML_BOOLS = frozenset("yYnN")
KEYS = st.text(CHARS, min_size=1, max_size=12).filter(lambda t: t not in GO_YAML_BOOLS)
SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**63)
           | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(CHARS, max_size=20).filter(lambda t: t not in GO_YAML_BOOLS))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(KEYS, inner, max_size=4), max_leaves=30)


@settings(max_examples=150, deadline=None)
@given(JSON_VALUES, st.booleans())
def test_any_json_value_written_as_yaml_or_json_decodes_to_itself(value: Any,
                                                                  as_json: bool) -> None:
    doc = {"root": value}
    text = json.dumps(doc) if as_json else yaml.safe_dump(doc, allow_unicode=True)
    assert decode(text.encode()) == [doc]


def test_single_letter_booleans_are_read_as_kubectl_reads_them() -> None:
    text = "a: [y, Y, n, N, 'y', \"n\", yes, off]\nY: 1\n"
    assert decode(text.encode()) == [{"a": [True, True, False, False, "y", "n", True, False],
                                      "true": 1}]


def _nested(keys: list[str], dup: str, flow: bool) -> str:
    """Mappings nested along ``keys``; the innermost one gives ``dup`` twice."""
    if flow:
        inner = f'{{"{dup}": 1, "other": 2, "{dup}": 3}}'
        for key in reversed(keys):
            inner = f'{{"{key}": {inner}}}'
        return inner
    lines = [f'{"  " * i}"{key}":' for i, key in enumerate(keys)]
    pad = "  " * len(keys)
    lines += [f'{pad}"{dup}": 1', f"{pad}other: 2", f'{pad}"{dup}": 3']
    return "\n".join(lines) + "\n"


SAFE_KEYS = st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=1,
                    max_size=10).filter(lambda k: k != "other")


@settings(max_examples=100, deadline=None)
@given(st.lists(SAFE_KEYS, max_size=30), SAFE_KEYS, st.sampled_from(["block", "flow", "json"]))
def test_a_key_given_twice_at_any_depth_is_refused_naming_the_key(
        keys: list[str], dup: str, form: str) -> None:
    text = _nested(keys, dup, flow=form != "block")
    with pytest.raises(DecodeError, match=f'mapping key "{dup}" already defined'):
        decode(text.encode())


def test_a_key_given_twice_is_refused_with_both_lines() -> None:
    text = b"spec:\n  level: encrypt\n  destinations: [a.example]\n  level: none\n"
    with pytest.raises(DecodeError) as err:
        decode(text)
    assert str(err.value) == 'line 4, column 3: mapping key "level" already defined at line 2'


def test_a_merge_key_may_be_overridden_as_yaml_allows() -> None:
    text = b"base: &b {level: may, x: 1}\nspec:\n  <<: *b\n  level: encrypt\n"
    assert decode(text) == [{"base": {"level": "may", "x": 1},
                             "spec": {"level": "encrypt", "x": 1}}]


REFUSED_TAGS = st.sampled_from([
    "!!binary aGVsbG8=", "!!set {a, b}", "!!omap [a: 1]", "!!pairs [a: 1]",
    "!!python/object/apply:os.system [true]", "!!python/name:os.system ''",
    "!!python/tuple [1]", "!<tag:example.com,2000:x> 1", "!!merge x",
]) | st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=1,
             max_size=8).map(lambda t: f"!{t} value")


@settings(max_examples=100, deadline=None)
@given(REFUSED_TAGS, st.integers(0, 5), st.booleans())
def test_a_tag_without_a_json_value_is_refused_anywhere(tagged: str, depth: int,
                                                        in_list: bool) -> None:
    value = f"[{tagged}]" if in_list else tagged
    text = "".join(f"{'  ' * i}k{i}:\n" for i in range(depth)) + f"{'  ' * depth}v: {value}\n"
    with pytest.raises(DecodeError, match=r"^line \d+, column \d+: tag .* refused"):
        decode(text.encode())


@pytest.mark.parametrize(("text", "value"), [
    ("t: 2026-12-31T00:00:00Z", "2026-12-31T00:00:00Z"),
    ("t: 2026-12-31t00:00:00.5+02:00", "2026-12-31t00:00:00.5+02:00"),
    ("t: 2026-12-31", "2026-12-31"),
    ("t: !!timestamp 2026-12-31", "2026-12-31"),
    ("t: =", "="),
    ("t: !!str 12", "12"),
])
def test_times_and_dates_stay_the_strings_written(text: str, value: str) -> None:
    assert decode(text.encode()) == [{"t": value}]


@settings(max_examples=50, deadline=None)
@given(st.datetimes(timezones=st.just(__import__("datetime").UTC)))
def test_any_unquoted_rfc3339_time_is_a_string(moment: Any) -> None:
    written = moment.isoformat().replace("+00:00", "Z")
    assert decode(f"expiresAt: {written}\n".encode()) == [{"expiresAt": written}]


def test_integer_and_boolean_keys_become_their_text_as_kubectl_makes_them() -> None:
    assert decode(b"1: a\ntrue: b\n") == [{"1": "a", "true": "b"}]


@pytest.mark.parametrize("text", ["{1.5: a}", "k: {null: a}", "k: {[a]: b}",
                                  "? {a: 1}\n: b\n"])
def test_other_keys_are_refused(text: str) -> None:
    with pytest.raises(DecodeError, match="a mapping key must be a string"):
        decode(text.encode())


@pytest.mark.parametrize("text", ["a: .nan", "a: -.inf", "a: 1.0e+999", '{"a": NaN}',
                                  '{"a": 1e999}', '{"a": -Infinity}'])
def test_numbers_json_cannot_carry_are_refused(text: str) -> None:
    with pytest.raises(DecodeError):
        decode(text.encode())


@pytest.mark.parametrize("text", ["a: " + "9" * 5000, '{"a": ' + "9" * 5000 + "}"])
def test_an_integer_of_thousands_of_digits_is_refused(text: str) -> None:
    with pytest.raises(DecodeError, match="integer too large"):
        decode(text.encode())


SHAPES = st.sampled_from(["seq", "map"])


def _bomb(width: int, levels: int, shape: str) -> str:
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    for i in range(1, levels + 1):
        refs = [f"*a{i - 1}"] * width
        body = (f"[{', '.join(refs)}]" if shape == "seq"
                else "{" + ", ".join(f"k{j}: {r}" for j, r in enumerate(refs)) + "}")
        lines.append(f"a{i}: &a{i} {body}")
    return "\n".join(lines) + "\n"


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 12), st.integers(1, 12), SHAPES)
def test_aliases_that_expand_past_the_budget_are_refused_quickly(width: int, levels: int,
                                                                 shape: str) -> None:
    text = _bomb(width, levels, shape).encode()
    expanded = sum(width ** (i + 1) for i in range(1, levels + 1))  # a rough lower bound
    start = time.monotonic()
    if expanded > 4 * MAX_ALIAS_NODES:
        with pytest.raises(DecodeError, match="aliases expand to more than"):
            decode(text)
    else:
        try:
            decode(text)
        except DecodeError as exc:
            assert "aliases expand" in str(exc)
    assert time.monotonic() - start < 2


@settings(max_examples=40, deadline=None)
@given(st.integers(MAX_DEPTH + 1, 5000), st.sampled_from(["flow", "block", "json"]))
def test_nesting_past_the_limit_is_refused_never_a_recursion_error(depth: int,
                                                                   form: str) -> None:
    if form == "block":
        depth = min(depth, 400)  # indentation grows with depth: keep the text small
        text = "".join(f"{' ' * i}k:\n" for i in range(depth)) + f"{' ' * depth}v\n"
    elif form == "flow":
        text = "a: " + "[" * depth + "]" * depth
    else:
        text = '{"a": ' + "[" * depth + "]" * depth + "}"
    with pytest.raises(DecodeError, match="nest"):
        decode(text.encode())


def test_nesting_at_the_limit_is_accepted() -> None:
    depth = MAX_DEPTH - 1  # plus the top-level mapping
    assert decode(("a: " + "[" * depth + "]" * depth).encode())


def test_a_yaml_error_says_where_and_what_never_the_line() -> None:
    text = b"db_password: hunter2 : x\n"
    with pytest.raises(DecodeError) as err:
        decode(text)
    assert "hunter2" not in str(err.value)
    assert str(err.value).startswith("invalid YAML: line 1, column ")


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=3000))
def test_clip_leaves_no_unsafe_character_and_is_short(text: str) -> None:
    shown = clip(text)
    assert unsafe_character(shown.replace(" ", "")) is None
    assert len(shown) < 300


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_are_refused(data: bytes) -> None:
    try:
        docs = decode(data)
    except DecodeError as exc:
        assert "\n" not in str(exc)
    else:
        json.dumps(docs, allow_nan=False)  # JSON values only


@pytest.mark.parametrize("form", ["list", "aliases"])
def test_more_nodes_than_the_file_budget_are_refused_before_a_tree_is_built(form: str) -> None:
    if form == "list":
        text = "a: [" + "1," * MAX_NODES + "1]\n"
    else:  # each alias small, their sum past the budget of the whole file
        text = "".join(f"---\nx: &a [1, 2, 3]\ny: [{', '.join(['*a'] * 2000)}]\n"
                       for _ in range(MAX_NODES // 8000 + 1))
    start = time.monotonic()
    with pytest.raises(DecodeError, match=f"more than {MAX_NODES} YAML nodes"):
        decode(text.encode())
    assert time.monotonic() - start < 5


REPO = Path(__file__).parents[2]
SHIPPED = sorted(p for top in ("manifests", "crds", "demo", "deploy")
                 for p in (REPO / top).rglob("*.y*ml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_manifest_passes_the_strict_loader(path: Path) -> None:
    """Users copy these: none may hold a duplicate key, a tag or a bound the gate refuses."""
    decode(path.read_bytes())


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10), st.sampled_from(["seq", "map"]))
def test_an_alias_inside_its_own_anchor_is_refused(depth: int, shape: str) -> None:
    inner = "*a"
    for i in range(depth):
        inner = f"[{inner}]" if i % 2 else f"{{k{i}: {inner}}}"
    text = f"x: &a [1, {inner}]\n" if shape == "seq" else f"x: &a {{v: {inner}}}\n"
    with pytest.raises(DecodeError, match="inside its own anchor"):
        decode(text.encode())


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1,
               max_size=5000))
def test_a_path_in_any_error_is_escaped_and_short(name: str) -> None:
    """Newlines, controls and bidi overrides in a name cannot forge or reorder a line."""
    try:
        list(read_inputs([f"/nonexistent-mailtls/{name}"]))
    except FileError as exc:
        message = str(exc)
    else:
        pytest.fail("a path under /nonexistent-mailtls was read")
    assert unsafe_character(message.replace(" ", "")) is None
    assert len(message) < 400
