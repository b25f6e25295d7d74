"""The CRD's OpenAPI schema as a JSON Schema validator with the API server's semantics:
RE2 patterns, list-type set/map, formats, messages as kubectl prints them."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import re2

from .source import FieldError, version_schema
from .timefmt import is_kube_datetime

# --------------------------------------------------------------------------- schema


def _to_json_schema(node: Any, *, strict_objects: bool) -> Any:
    """OpenAPI v3 (Kubernetes structural) schema -> JSON Schema.

    Drops ``x-kubernetes-*`` extensions but the list types (CEL rules are run
    separately; ``x-kubernetes-list-type`` is a keyword of our validator) and, with
    ``strict_objects``, refuses unknown properties where Kubernetes would prune
    them: kubectl's server-side field validation (Strict, the default since
    1.27) refuses them too, and silently losing a misspelt ``tafile`` is worse.
    """
    if isinstance(node, list):
        return [_to_json_schema(item, strict_objects=strict_objects) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _LIST_KEYWORDS:
            out[key] = value
            continue
        if key.startswith("x-kubernetes-") or key == "description":
            continue
        if key == "properties":
            out[key] = {
                name: _to_json_schema(sub, strict_objects=strict_objects)
                for name, sub in value.items()
            }
        else:
            out[key] = _to_json_schema(value, strict_objects=strict_objects)
    if (
        strict_objects
        and node.get("type") == "object"
        and "properties" in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


_LIST_KEYWORDS = ("x-kubernetes-list-type", "x-kubernetes-list-map-keys")


@functools.cache
def _compiled(pattern: str) -> Any:
    return re2.compile(pattern)


@functools.lru_cache(maxsize=16384)
def pattern_matches(pattern: str, value: str) -> bool:
    """The API server's ``pattern``: Go RE2, unanchored search, ``$`` only at the very end.

    A string that is not valid UTF-8 (a lone surrogate) matches nothing: the API
    server never sees one, as JSON decoding replaces it.  Cached: most values (match
    names, protocols, paths, instances) repeat across policies, and google-re2's Python
    wrapper costs a few microseconds a call.
    """
    try:
        return _compiled(pattern).search(value) is not None
    except UnicodeEncodeError:
        return False


def _re2_pattern(validator: Any, pattern: str, instance: Any, schema: Any
                 ) -> Iterator[jsonschema.ValidationError]:
    if isinstance(instance, str) and not pattern_matches(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def _list_type(validator: Any, list_type: str, instance: Any, schema: Any
               ) -> Iterator[jsonschema.ValidationError]:
    """``set``: every item unique; ``map``: every item's key fields unique (the first
    duplicate is reported at its index, as ``Duplicate value``)."""
    if not isinstance(instance, list) or list_type not in ("set", "map"):
        return
    if list_type == "set" and all(isinstance(i, str) for i in instance) \
            and len(set(instance)) == len(instance):
        return  # the common case, without serialising every item
    keys = schema.get("x-kubernetes-list-map-keys") or []
    seen: set[str] = set()
    for index, item in enumerate(instance):
        if list_type == "map" and isinstance(item, dict):
            ident: Any = {k: item.get(k) for k in keys}
            shown = "map[string]interface {}{" + ", ".join(
                f'"{k}":{_json(v)}' for k, v in ident.items()) + "}"
        else:
            ident, shown = item, _json(item)
        token = _json(ident)
        if token in seen:
            yield jsonschema.ValidationError(f"Duplicate value: {shown}", path=(index,))
        seen.add(token)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


_SCHEMA_FORMATS = jsonschema.FormatChecker(formats=())


@_SCHEMA_FORMATS.checks("regex", raises=re2.error)
def _is_re2(value: object) -> bool:
    """A schema's patterns must compile in RE2 (Python's ``re`` cannot read ``\\p{Cc}``)."""
    return not isinstance(value, str) or _compiled(value) is not None


_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("date-time", raises=ValueError)
def _is_datetime(value: object) -> bool:
    """kube-openapi's ``format: date-time`` (:func:`.timefmt.is_kube_datetime`): exactly
    as lenient as the API server's schema check; CEL's ``timestamp()`` is stricter."""
    if not isinstance(value, str):
        return True
    if not is_kube_datetime(value):
        raise ValueError("not an RFC 3339 date-time")
    return True


@functools.cache
def _validator(part: str) -> jsonschema.protocols.Validator:
    """A validator of ``spec`` or ``status`` with the API server's pattern and list rules.

    ``spec`` refuses unknown fields (as kubectl's Strict field validation does);
    ``status`` is written by the operator with the default (Warn), where unknown
    fields are pruned, so they are not errors there.
    """
    return structural_validator(version_schema()["properties"][part],
                                strict_objects=part == "spec")


def structural_validator(openapi: Any, *, strict_objects: bool
                         ) -> jsonschema.protocols.Validator:
    """A validator of any CRD's OpenAPI (structural) schema with the API server's rules:
    RE2 patterns, list-type set/map, RFC 3339 date-time; every CRD of the project is
    judged by it (MailTLSPolicy here, MailTLSDiscovery in discovery/objects.py)."""
    schema = _to_json_schema(openapi, strict_objects=strict_objects)
    base: Any = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    base.check_schema(schema, format_checker=_SCHEMA_FORMATS)
    extend: Any = jsonschema.validators.extend
    cls = extend(base, {"pattern": _re2_pattern, "x-kubernetes-list-type": _list_type})
    validator: jsonschema.protocols.Validator = cls(schema, format_checker=_FORMATS)
    return validator


def _path(prefix: str, parts: Any) -> str:
    out = prefix
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _quote(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else '"' + value.encode(
        "unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    return text if len(text) <= 80 else text[:77] + '..."'


def _schema_message(error: jsonschema.ValidationError) -> str:
    """jsonschema's wording -> the API server's wording, so both read the same."""
    v: Any = error.validator
    value: Any = error.validator_value
    instance: Any = error.instance
    schema: Any = error.schema
    if v == "enum":
        allowed = ", ".join(f'"{a}"' for a in value)
        return f"Unsupported value: {_quote(instance)}: supported values: {allowed}"
    if v == "required":
        return "Required value"
    if v == "pattern":
        return f"Invalid value: {_quote(instance)}: must match the allowed syntax"
    if v in ("maxItems", "maxLength"):
        what = "items" if v == "maxItems" else "bytes"
        return f"Too long: must have at most {value} {what}"
    if v in ("minItems", "minLength"):
        what = "item" if v == "minItems" else "character"
        n = value
        return f"Invalid value: must have at least {n} {what}{'s' if n != 1 else ''}"
    if v == "type":
        return f"Invalid value: {_quote(instance)}: must be of type {value}"
    if v == "format":
        return f"Invalid value: {_quote(instance)}: must be an RFC 3339 date-time"
    if v == "x-kubernetes-list-type":
        return error.message
    if v == "additionalProperties":
        extra = sorted(set(instance) - set(schema.get("properties", {})))
        return "unknown field " + ", ".join(f'"{e}"' for e in extra)
    return f"Invalid value: {error.message}"


def _fast_schema(node: Any, formats: dict[str, Callable[[str], bool]]) -> Any:
    """The JSON Schema of :func:`_to_json_schema` for fastjsonschema: each ``pattern``
    becomes a format checked by RE2 (fastjsonschema would use Python's ``re``), a
    ``set`` list of scalars ``uniqueItems``.  ``map`` lists have no equivalent: a schema
    with one is left to jsonschema alone."""
    if isinstance(node, list):
        return [_fast_schema(item, formats) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "pattern":
            if "format" in node:
                raise ValueError("a schema node with both pattern and format")
            name = f"k8s-pattern-{len(formats)}"
            formats[name] = functools.partial(pattern_matches, value)
            out["format"] = name
        elif key == "x-kubernetes-list-type":
            if value == "map":
                raise ValueError("list-type map")
            out["uniqueItems"] = value == "set"
        elif key == "properties":
            out[key] = {name: _fast_schema(sub, formats) for name, sub in value.items()}
        else:
            out[key] = _fast_schema(value, formats)
    return out


@functools.cache
def _fast_validator(part: str) -> Callable[[Any], Any] | None:
    """A compiled yes/no check (fastjsonschema: ~3x faster than jsonschema's generic
    walk, which dominated validating 10,000 policies).  Proven to agree with the
    jsonschema validator by property tests; only a refusal pays for jsonschema's
    detailed errors.  None where the schema uses something it cannot express."""
    import fastjsonschema

    formats: dict[str, Callable[[str], bool]] = {
        "date-time": lambda v: _is_datetime_quiet(v)}
    try:
        schema = _fast_schema(_to_json_schema(version_schema()["properties"][part],
                                              strict_objects=part == "spec"), formats)
    except ValueError:
        return None
    check: Callable[[Any], Any] = fastjsonschema.compile(schema, formats=formats,
                                                         use_default=False)
    return check


def _is_datetime_quiet(value: str) -> bool:
    try:
        return _is_datetime(value)
    except ValueError:
        return False


def schema_valid(spec: Any, part: str = "spec") -> bool:
    """Does ``spec`` pass the schema?  The compiled check where there is one."""
    import fastjsonschema

    fast = _fast_validator(part)
    if fast is None:
        return bool(_validator(part).is_valid(spec))
    try:
        fast(spec)
    except fastjsonschema.JsonSchemaException:
        return False
    return True


def schema_errors(spec: Any, part: str = "spec") -> list[FieldError]:
    """Every schema violation of ``spec`` (or of a ``status``), each naming its field."""
    if schema_valid(spec, part):
        return []
    return detailed_schema_errors(spec, part)


def detailed_schema_errors(spec: Any, part: str = "spec") -> list[FieldError]:
    """jsonschema's walk: every violation with its field and the API server's wording."""
    out = []
    for err in _validator(part).iter_errors(spec):
        field = _path(part, err.absolute_path)
        if err.validator == "required":
            required: Any = err.validator_value
            instance: Any = err.instance
            missing = [r for r in required if r not in (instance or {})]
            for name in missing:
                out.append(FieldError(f"{field}.{name}", "Required value"))
            continue
        out.append(FieldError(field, _schema_message(err)))
    return sorted(set(out))
