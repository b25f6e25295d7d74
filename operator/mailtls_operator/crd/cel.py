"""The CRD's CEL rules, evaluated through twins (Python functions proven equal to the
rule by property tests), or by cel-python for a rule without a twin."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .source import FieldError, version_schema

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
