"""The CRD's CEL rules, evaluated through twins (Python functions proven equal to the
rule by property tests), or by cel-python for a rule without a twin."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .source import FieldError, version_schema
from .timefmt import Instant, parse_instant

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


_30_DAYS_NS = timedelta(hours=720) // timedelta(microseconds=1) * 1000


def _ts(exc: Mapping[str, Any], name: str) -> Instant:
    """CEL's ``timestamp(self.<name>)``: a time CEL cannot read is an evaluation error
    (ValueError), which refuses the object as it does on the API server."""
    try:
        return parse_instant(exc[name])
    except ValueError as err:
        raise ValueError(f"timestamp(self.{name}): {err}") from None


def _window(exc: Mapping[str, Any]) -> bool:
    """Subtraction only: adding 720h to a start in late 9999 would overflow."""
    starts, expires = _ts(exc, "startsAt"), _ts(exc, "expiresAt")
    return expires > starts and expires.minus(starts) <= _30_DAYS_NS


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
    "!has(self.enableRPK) || self.level in ['may', 'encrypt', 'fingerprint']":
        lambda s: not _has(s, "enableRPK") or s["level"] in ("may", "encrypt", "fingerprint"),
    "!has(self.enableRPK) || !self.enableRPK || self.level != 'fingerprint'"
    " || (has(self.matchKind) && self.matchKind == 'publicKey')":
        lambda s: not s.get("enableRPK", False) or s["level"] != "fingerprint"
        or s.get("matchKind") == "publicKey",
    "!has(self.matchKind) || self.level == 'fingerprint'":
        lambda s: not _has(s, "matchKind") or s["level"] == "fingerprint",
    "!has(self.tafile) || self.level in ['verify', 'secure']":
        lambda s: not _has(s, "tafile") or s["level"] in ("verify", "secure"),
    "!has(self.route) || self.destinations.all(d, !d.startsWith('.') && !d.startsWith('[')"
    " && !d.contains(':'))":
        lambda s: not _has(s, "route") or all(
            not d.startswith(".") and not d.startswith("[") and ":" not in d
            for d in s["destinations"]),
    "timestamp(self.expiresAt) > timestamp(self.startsAt) && timestamp(self.expiresAt)"
    " - timestamp(self.startsAt) <= duration('720h')":
        _window,
}


class CelEvaluator:
    """cel-python, compiled once per rule: the oracle, and the fallback for twinless rules."""

    def __init__(self, rules: list[CelRule]) -> None:
        import celpy.adapter  # local: only paid for when a rule has no twin, or by tests

        env = celpy.Environment()
        self._celpy = celpy
        self._programs = {r.rule: env.program(env.compile(r.rule)) for r in rules}

    def evaluate(self, rule: str, spec: Mapping[str, Any]) -> bool:
        """The rule's verdict; an evaluation error (cel-python's CELEvalError, or anything
        it lets escape) is a :class:`ValueError`, which refuses the object."""
        activation = {"self": self._celpy.adapter.json_to_cel(copy.deepcopy(dict(spec)))}
        try:
            result = self._programs[rule].evaluate(activation)
        except Exception as exc:  # cel-python raises its own types, and OverflowError
            raise ValueError(f"{type(exc).__name__}: {exc}") from None
        if isinstance(result, Exception):
            raise ValueError(f"{type(result).__name__}: {result}")
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
        try:
            ok = twin(target) if twin is not None else _cel_evaluator().evaluate(rule.rule,
                                                                                 target)
        except (ValueError, ArithmeticError, TypeError, KeyError) as exc:
            # the API server refuses an object whose rule cannot be evaluated
            out.append(FieldError(rule.field, f"{rule.message} (evaluation error: {exc})"))
            continue
        if not ok:
            out.append(FieldError(rule.field, rule.message))
    return out
