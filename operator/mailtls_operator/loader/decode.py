"""Bytes -> JSON documents, decoded the way kubectl and the API server decode them.  Pure.

kubectl turns YAML into JSON before anything reads it (sigs.k8s.io/yaml), and
the API server's strict field validation (kubectl's default) refuses a key
given twice in one mapping.  So a document here is JSON types only (``str``,
``int``, finite ``float``, ``bool``, ``None``, ``list``, ``dict`` with ``str``
keys): an unquoted time or date stays the string written (kubectl keeps it a
string; the model parses times itself), integer and boolean keys become their
text (as kubectl does), and a tag that has no JSON value (``!!binary``,
``!!set``, ``!!omap``, ``!!python/...``, a local ``!tag``) is refused, as is
``.nan``/``.inf`` (JSON cannot say them).

Every input is bounded before the work that could explode: nesting deeper than
:data:`MAX_DEPTH`, aliases that would expand to more than :data:`MAX_ALIAS_NODES`
nodes (a "billion laughs" is a few hundred bytes) and more than :data:`MAX_NODES`
nodes in a file are refused while the event stream is read, before a tree is built.  Errors say
line, column and the problem, never the text of the offending line: the file
may be a symlinked secret that is no policy at all.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import yaml
from yaml._yaml import CParser  # libyaml: PyYAML's wheels include it
from yaml.cyaml import CSafeLoader

from ..safetext import one_line

MAX_DEPTH = 100
"""Collections nested deeper than this are refused (MailTLSPolicy needs fewer than 10;
even large CRDs stay well under 100)."""

MAX_ALIAS_NODES = 10_000
"""Nodes a document may add through aliases (``*anchor``), counted as expanded: the
honest use (a shared list of instances) adds dozens; a bomb adds billions."""

MAX_NODES = 100_000
"""YAML nodes (scalars and collections, aliases counted expanded) in one file.  PyYAML
builds a Python object per node, tens of thousands a second on a busy machine: the
bound keeps a 3 MiB file of one-character list items (1.5 million nodes) from taking a
minute and 600 MiB.  A MailTLSPolicy is 10 to 30 nodes; a large CRD some ten thousand.
JSON files, decoded in C, have only the size bound."""

MAX_SHOWN = 240
"""Characters of user text (a key, a tag, a file name) shown in one message."""

JSON_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in
                      ("null", "bool", "int", "float", "str", "seq", "map", "timestamp"))
"""Tags with a JSON value; ``timestamp`` is kept as the string written, as kubectl does."""

_ANY_TAG_PREFIX = "tag:yaml.org,2002:"


class DecodeError(ValueError):
    """A document kubectl would refuse, or one past a bound; the message is one line
    (``line L, column C: problem``) with no content of the file."""


def clip(text: str, limit: int = MAX_SHOWN) -> str:
    """User text for a one-line message: unsafe characters escaped (newlines, controls,
    bidi and other format characters), then cut to ``limit`` characters."""
    safe = one_line(text)
    if len(safe) <= limit:
        return safe
    kept, size = [], 0
    for ch in text:  # whole escapes only: never half of a \u202e
        piece = one_line(ch) if ch != " " else ch
        if size + len(piece) > limit:
            break
        kept.append(piece)
        size += len(piece)
    return f"{''.join(kept)}...[{len(text) - len(kept)} more characters]"


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"


def _tag_name(tag: str) -> str:
    return "!!" + tag[len(_ANY_TAG_PREFIX):] if tag.startswith(_ANY_TAG_PREFIX) else tag


# ---------------------------------------------------------------- YAML: bounds on the events


def _check_events(text: str) -> None:
    """Depth and alias expansion, from the C parser's event stream (no tree is built).

    Each collection's expanded size is summed as it closes; an anchored node's size
    is remembered, and each alias adds that size again.
    """
    loader = CSafeLoader(text)
    try:
        sizes: dict[str, int] = {}
        stack: list[tuple[int, str | None]] = []  # (expanded nodes so far, anchor)
        added = nodes = 0
        while (event := loader.get_event()) is not None:
            kind = type(event)
            anchor = event.anchor if isinstance(event, yaml.NodeEvent) else None
            if kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
                if len(stack) >= MAX_DEPTH:
                    raise DecodeError(f"{_where(event.start_mark)}: nested deeper than "
                                      f"{MAX_DEPTH} levels")
                stack.append((1, anchor))
                continue
            if kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
                size, anchor = stack.pop()
                nodes += 1
            elif kind is yaml.ScalarEvent:
                size = 1
                nodes += 1
            elif kind is yaml.AliasEvent:
                if any(own == anchor for _, own in stack):
                    raise DecodeError(f"{_where(event.start_mark)}: alias *{clip(str(anchor))} "
                                      "inside its own anchor (a recursive structure)")
                size, anchor = sizes.get(str(anchor), 1), None
                added += size
                nodes += size
                if added > MAX_ALIAS_NODES:
                    raise DecodeError(f"{_where(event.start_mark)}: aliases expand to more "
                                      f"than {MAX_ALIAS_NODES} nodes")
            else:
                if kind is yaml.DocumentStartEvent:
                    sizes.clear()  # anchors are per document; the node count per file
                    added = 0
                continue
            if nodes > MAX_NODES:
                raise DecodeError(f"{_where(event.start_mark)}: more than {MAX_NODES} YAML "
                                  "nodes in one file")
            if anchor is not None:
                sizes[anchor] = size
            if stack:
                total, own = stack[-1]
                stack[-1] = (total + size, own)
    finally:
        loader.dispose()


# ---------------------------------------------------------------- YAML: JSON-typed construction


class _JsonConstructor(yaml.constructor.SafeConstructor):
    """SafeConstructor restricted to JSON values; duplicate keys refused."""

    yaml_constructors: ClassVar[dict[Any, Callable[..., Any]]] = {}

    def construct_undefined(self, node: yaml.Node) -> Any:
        raise DecodeError(f"{_where(node.start_mark)}: tag {clip(_tag_name(str(node.tag)))} "
                          "refused: only JSON values (string, number, boolean, null, list, "
                          "mapping) are accepted")

    def construct_string(self, node: yaml.Node) -> str:
        value = self.construct_scalar(node)  # type: ignore[arg-type]
        assert isinstance(value, str)
        return value

    def construct_finite_float(self, node: yaml.Node) -> float:
        value = self.construct_yaml_float(node)  # type: ignore[arg-type]
        if not math.isfinite(value):
            raise DecodeError(f"{_where(node.start_mark)}: {value} is not a JSON number")
        return value

    def construct_bounded_int(self, node: yaml.Node) -> int:
        try:
            return self.construct_yaml_int(node)  # type: ignore[arg-type]
        except ValueError as exc:  # more digits than int() converts (4300)
            raise DecodeError(f"{_where(node.start_mark)}: integer too large") from exc

    def construct_json_map(self, node: yaml.MappingNode) -> Iterator[dict[str, Any]]:
        data: dict[str, Any] = {}
        yield data
        explicit = len(node.value)
        self.flatten_mapping(node)  # merge keys (<<) first, then the mapping's own pairs
        merged = len(node.value) - explicit
        first_line: dict[str, int] = {}
        for i, (key_node, value_node) in enumerate(node.value):
            key = self._key(key_node)
            if i >= merged:
                if key in first_line:
                    raise DecodeError(f"{_where(key_node.start_mark)}: mapping key "
                                      f"\"{clip(key)}\" already defined at line "
                                      f"{first_line[key]}")
                first_line[key] = key_node.start_mark.line + 1
            data[key] = self.construct_object(value_node, deep=False)

    def _key(self, node: yaml.Node) -> str:
        key = self.construct_object(node, deep=True)
        if isinstance(key, bool):
            return "true" if key else "false"
        if isinstance(key, int | str):
            return str(key)
        raise DecodeError(f"{_where(node.start_mark)}: a mapping key must be a string "
                          "(kubectl's JSON has no other)")


def _construct_bool(loader: _JsonConstructor, node: yaml.ScalarNode) -> bool:
    """YAML 1.1 booleans as kubectl's go-yaml reads them: PyYAML's words plus the single
    letters y/Y/n/N (a plain ``n`` is ``false`` to kubectl, so it must be to us)."""
    value = str(node.value)
    if value in ("y", "Y", "n", "N"):
        return value in ("y", "Y")
    return bool(yaml.constructor.SafeConstructor.construct_yaml_bool(loader, node))


for _tag, _method in (
        ("null", yaml.constructor.SafeConstructor.construct_yaml_null),
        ("bool", _construct_bool),
        ("int", _JsonConstructor.construct_bounded_int),
        ("float", _JsonConstructor.construct_finite_float),
        ("str", _JsonConstructor.construct_string),
        ("timestamp", _JsonConstructor.construct_string),
        ("value", _JsonConstructor.construct_string),  # a plain "=" (YAML 1.1's value key)
        ("seq", yaml.constructor.SafeConstructor.construct_yaml_seq),
        ("map", _JsonConstructor.construct_json_map)):
    _JsonConstructor.add_constructor(f"{_ANY_TAG_PREFIX}{_tag}", _method)  # type: ignore[type-var]
_JsonConstructor.add_constructor(None, _JsonConstructor.construct_undefined)  # type: ignore[type-var]


class _GoYamlResolver(yaml.resolver.Resolver):
    """PyYAML's YAML 1.1 resolver plus go-yaml's single-letter booleans."""


_GoYamlResolver.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"),
                                      list("yYnN"))


class _JsonLoader(CParser, _JsonConstructor, _GoYamlResolver):
    """libyaml's parser and composer with the JSON-typed constructor."""

    def __init__(self, stream: str) -> None:
        CParser.__init__(self, stream)
        _JsonConstructor.__init__(self)
        _GoYamlResolver.__init__(self)


def _yaml_documents(text: str) -> list[Any]:
    _check_events(text)
    loader = _JsonLoader(text)
    try:
        return list(loader.get_data() for _ in iter(loader.check_data, False))
    finally:
        loader.dispose()


# ---------------------------------------------------------------- JSON


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def _check_json_depth(text: str) -> None:
    depth = 0
    for m in _JSON_TOKEN.finditer(text):
        token = m.group()
        if token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                line = text.count("\n", 0, m.start()) + 1
                raise DecodeError(f"line {line}: nested deeper than {MAX_DEPTH} levels")
        elif token in "]}":
            depth -= 1


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DecodeError(f"mapping key \"{clip(key)}\" already defined")
        out[key] = value
    return out


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise DecodeError(f"number {clip(text)} is out of range")
    return value


def _no_constant(text: str) -> Any:
    raise DecodeError(f"{text} is not a JSON number")


_DECODER = json.JSONDecoder(object_pairs_hook=_json_object, parse_float=_json_float,
                            parse_constant=_no_constant)


def _json_documents(text: str) -> list[Any]:
    """A stream of JSON values (kubectl reads concatenated objects)."""
    _check_json_depth(text)
    docs: list[Any] = []
    pos = 0
    while (pos := len(text) - len(text[pos:].lstrip())) < len(text):
        try:
            doc, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            raise  # not JSON after all: decode() reads it as YAML
        except ValueError as exc:  # an integer past int()'s digit limit
            if isinstance(exc, DecodeError):
                raise
            raise DecodeError("integer too large") from exc
        docs.append(doc)
    return docs


# ---------------------------------------------------------------- entry point


def decode(data: bytes) -> list[Any]:
    """The documents of a file: JSON if it starts with ``{`` and is JSON (as kubectl
    sniffs it), else a YAML stream.  Empty documents are ``None``.  Raises :class:`DecodeError`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if text.startswith("\ufeff"):
        text = text[1:]
    if text.lstrip().startswith("{"):
        try:
            return _json_documents(text)
        except json.JSONDecodeError:
            pass  # a YAML flow mapping ({a: b}) or broken: YAML says which, and where
    try:
        return _yaml_documents(text)
    except yaml.MarkedYAMLError as exc:  # the problem and where, never the line's text
        problem = clip(exc.problem or exc.context or "invalid YAML", 200)
        raise DecodeError(f"invalid YAML: {_where(exc.problem_mark or exc.context_mark)}: "
                          f"{problem}") from exc
    except yaml.YAMLError as exc:  # a reader error: a character YAML does not allow
        raise DecodeError(f"invalid YAML: {clip(str(exc).splitlines()[0], 200)}") from exc
