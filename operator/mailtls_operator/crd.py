"""The CRD in ``crds/`` as an executable validator: its OpenAPI schema and its CEL rules.

The CRD is the single source of validation truth.  The API server enforces it at
``kubectl apply``; this module makes the operator (at reconcile) and ``mailtls
validate`` (offline, in a GitOps pipeline) refuse exactly the same objects, by
loading the very same file.

CEL rules are evaluated through *twins*: Python functions proven equal to the
CEL expression by property tests (``tests/unit/test_cel_twins.py``) with
cel-python as the oracle.  A twin is looked up by the exact rule text, so a rule
edited in the CRD without a matching twin is still enforced, by cel-python
itself (slower, but never skipped).  cel-python measured 0.77-3.3 ms per policy;
twins keep 10,000 policies well under a second.

The schema is judged with the API server's semantics, not Python's: ``pattern``
is compiled by RE2 (``google-re2``, the library Go's ``regexp`` follows), where
``$`` matches only at the end of the text -- Python's ``re.search`` also lets it
match before a final newline, which let ``"example.com\\n"`` through -- and
``\\d``/``\\w`` are ASCII; ``x-kubernetes-list-type: set`` refuses duplicate
items and ``map`` duplicate keys, as the API server does with 422.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import re2
import yaml

CRD_FILENAME = "mailtlspolicies.mailtls.io.yaml"
GROUP = "mailtls.io"
VERSION = "v1alpha1"
PLURAL = "mailtlspolicies"
KIND = "MailTLSPolicy"


@dataclass(frozen=True, order=True)
class FieldError:
    """One refusal: the field (``spec.match``) and the reason, as a person reads it."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def crd_path() -> Path:
    """Where the CRD is: inside an installed wheel, or in the source tree's ``crds/``."""
    packaged = resources.files("mailtls_operator").joinpath("crd.yaml")
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "crds" / CRD_FILENAME


@functools.cache
def load_crd() -> dict[str, Any]:
    """The CRD document, parsed once."""
    with crd_path().open(encoding="utf-8") as fh:
        doc: dict[str, Any] = yaml.safe_load(fh)
    return doc


def version_schema() -> dict[str, Any]:
    """The ``openAPIV3Schema`` of the served version."""
    for version in load_crd()["spec"]["versions"]:
        if version["name"] == VERSION:
            schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
            return schema
    raise LookupError(f"CRD has no version {VERSION}")


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
    import json

    return json.dumps(value, sort_keys=True, ensure_ascii=False)


_SCHEMA_FORMATS = jsonschema.FormatChecker(formats=())


@_SCHEMA_FORMATS.checks("regex", raises=re2.error)
def _is_re2(value: object) -> bool:
    """A schema's patterns must compile in RE2 (Python's ``re`` cannot read ``\\p{Cc}``)."""
    return not isinstance(value, str) or _compiled(value) is not None


_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("date-time", raises=ValueError)
def _is_datetime(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value):
        raise ValueError("not an RFC 3339 date-time")
    datetime.fromisoformat(value.replace("Z", "+00:00"))
    return True


@functools.cache
def _validator(part: str) -> jsonschema.protocols.Validator:
    """A validator of ``spec`` or ``status`` with the API server's pattern and list rules.

    ``spec`` refuses unknown fields (as kubectl's Strict field validation does);
    ``status`` is written by the operator with the default (Warn), where unknown
    fields are pruned, so they are not errors there.
    """
    schema = _to_json_schema(version_schema()["properties"][part],
                             strict_objects=part == "spec")
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


# ----------------------------------------------------------------------------- CEL


@dataclass(frozen=True)
class CelRule:
    """One ``x-kubernetes-validations`` entry of the spec."""

    rule: str
    message: str
    field: str
    reason: str
    path: tuple[str, ...] = ()
    """Where ``self`` is, below spec: () for spec itself, ("exception",) for its object."""


def _walk_rules(node: Mapping[str, Any], path: tuple[str, ...]) -> Iterator[CelRule]:
    for r in node.get("x-kubernetes-validations", []):
        yield CelRule(
            rule=r["rule"],
            message=r.get("message", f"failed rule: {r['rule']}"),
            field="spec" + "".join(f".{p}" for p in path) + r.get("fieldPath", ""),
            reason=r.get("reason", "FieldValueInvalid"),
            path=path,
        )
    for name, sub in (node.get("properties") or {}).items():
        if sub.get("type") == "object":
            yield from _walk_rules(sub, (*path, name))


@functools.cache
def _rules() -> tuple[CelRule, ...]:
    return tuple(_walk_rules(version_schema()["properties"]["spec"], ()))


def cel_rules() -> list[CelRule]:
    """Every CEL rule under spec (spec's own and nested objects'), with its field."""
    return list(_rules())


Twin = Callable[[Mapping[str, Any]], bool]


def _has(spec: Mapping[str, Any], name: str) -> bool:
    return name in spec


_30_DAYS = timedelta(hours=720)


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


_NONE_ATTRS = ("match", "ciphers", "protocols", "exclude", "tafile", "servername",
               "connectionReuse")

# Python twins of the CRD's CEL rules, keyed by the exact rule text.  Each is
# proven equal to cel-python's verdict by property tests.
TWINS: dict[str, Twin] = {
    "self.level != 'none' || (!has(self.match) && !has(self.ciphers) && !has(self.protocols)"
    " && !has(self.exclude) && !has(self.tafile) && !has(self.servername)"
    " && !has(self.connectionReuse))":
        lambda s: s["level"] != "none" or not any(_has(s, a) for a in _NONE_ATTRS),
    "!has(self.match) || self.level in ['fingerprint', 'verify', 'secure']":
        lambda s: not _has(s, "match") or s["level"] in ("fingerprint", "verify", "secure"),
    "self.level != 'fingerprint' || has(self.match)":
        lambda s: s["level"] != "fingerprint" or _has(s, "match"),
    "self.level != 'fingerprint' || !has(self.match) || self.match.all(m, m.contains(':'))":
        lambda s: s["level"] != "fingerprint" or not _has(s, "match")
        or all(":" in m for m in s["match"]),
    "self.level == 'fingerprint' || !has(self.match) || self.match.all(m, !m.contains(':'))":
        lambda s: s["level"] == "fingerprint" or not _has(s, "match")
        or all(":" not in m for m in s["match"]),
    "!has(self.tafile) || self.level in ['verify', 'secure']":
        lambda s: not _has(s, "tafile") or s["level"] in ("verify", "secure"),
    "!has(self.route) || self.destinations.all(d, !d.startsWith('.') && !d.startsWith('[')"
    " && !d.contains(':'))":
        lambda s: not _has(s, "route") or all(
            not d.startswith(".") and not d.startswith("[") and ":" not in d
            for d in s["destinations"]),
    "timestamp(self.expiresAt) > timestamp(self.startsAt) && timestamp(self.expiresAt)"
    " - timestamp(self.startsAt) <= duration('720h')":
        lambda e: _ts(e["startsAt"]) < _ts(e["expiresAt"]) <= _ts(e["startsAt"]) + _30_DAYS,
}


class CelEvaluator:
    """cel-python, compiled once per rule: the oracle, and the fallback for twinless rules."""

    def __init__(self, rules: list[CelRule]) -> None:
        import celpy.adapter  # local: only paid for when a rule has no twin, or by tests

        env = celpy.Environment()
        self._celpy = celpy
        self._programs = {r.rule: env.program(env.compile(r.rule)) for r in rules}

    def evaluate(self, rule: str, spec: Mapping[str, Any]) -> bool:
        activation = {"self": self._celpy.adapter.json_to_cel(copy.deepcopy(dict(spec)))}
        result = self._programs[rule].evaluate(activation)
        if isinstance(result, Exception):
            raise result
        return bool(result)


@functools.cache
def _cel_evaluator() -> CelEvaluator:
    return CelEvaluator(cel_rules())


def cel_errors(spec: Mapping[str, Any], *, oracle: bool = False) -> list[FieldError]:
    """CEL rule failures of a schema-valid ``spec``.

    ``oracle=True`` runs cel-python for every rule (tests use it to prove the
    twins); otherwise twins are used where one exists for the exact rule text.
    """
    out = []
    for rule in _rules():
        target: Any = spec
        for name in rule.path:
            target = target.get(name) if isinstance(target, Mapping) else None
        if target is None:
            continue  # like the API server: a rule on an absent object does not run
        twin = None if oracle else TWINS.get(rule.rule)
        ok = twin(target) if twin is not None else _cel_evaluator().evaluate(rule.rule, target)
        if not ok:
            out.append(FieldError(rule.field, rule.message))
    return out


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
