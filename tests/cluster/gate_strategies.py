"""Hypothesis strategies for the offline-gate differential test: whole objects of both
kinds, each field absent, plausible, hostile (control, format and separator characters,
injections) or of another JSON type; drawn with a fixed seed by :func:`draw_many`.

The drawn objects are cached by :mod:`.gate_objects` under a key made of this file's
text: any change here draws them anew.
"""

from __future__ import annotations

import copy
from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from mailtls_operator.policy import LEVELS
from tests.unit import strategies as unit

API_VERSION = "mailtls.io/v1alpha1"
KINDS = ("MailTLSPolicy", "MailTLSDiscovery")

OTHER_TYPES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                        st.floats(allow_nan=False, allow_infinity=False),
                        st.just([]), st.just({}), st.just(["x"]), st.just({"a": "b"}))
HOSTILE = unit.hostile
times = st.one_of(
    st.datetimes().map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%SZ")),
    st.sampled_from([
        "2026-12-07T00:00:00Z", "2026-12-08T00:00:00Z", "2027-01-06T00:00:00Z",
        "2026-12-07T00:00:00.123456789Z", "2026-12-07T00:00:00+01:00", "2026-12-07T00:00:00-0100",
        "2026-12-07t00:00:00z", "2026-12-07 00:00:00Z", "2026-12-07T00:00:00", "2026-12-07",
        "2026-12-07T24:00:00Z", "2026-12-07T23:59:60Z", "0000-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z", "2026-02-30T00:00:00Z", "2026-12-07T00:00:00.Z",
        "2026-12-07T00:00:00.1234567890123Z", "2026-12-07T00:00Z", "20261207T000000Z",
        "2026-12-07T00:00:00+24:00", "2026-12-07T00:00:00+14:00",
        "2026-12-07T00:00:00\u221201:00", "\uff12\uff10\uff12\uff16-12-07T00:00:00Z",
        "2026-12-07T00:00:00Z\n", " 2026-12-07T00:00:00Z"]),
    HOSTILE)
reasons = st.one_of(st.sampled_from(["INC-1 partner certificate expired", "ab", "abc",
                                     " leading", "trailing ", "tab\tinside", "x" * 513]),
                    st.text(min_size=0, max_size=40), HOSTILE)


def _maybe_hostile(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the field's plausible values, sometimes a hostile string or another type."""
    return st.one_of(valid, valid, valid, HOSTILE, OTHER_TYPES)


def _list_of(item: st.SearchStrategy[Any], max_size: int = 4) -> st.SearchStrategy[Any]:
    return _maybe_hostile(st.lists(st.one_of(item, item, item, HOSTILE, OTHER_TYPES),
                                   min_size=0, max_size=max_size))


@st.composite
def _exception(draw: st.DrawFn) -> Any:
    exc = {"startsAt": draw(_TIMES), "expiresAt": draw(_TIMES), "reason": draw(_REASONS)}
    for key in list(exc):
        if draw(st.integers(0, 9)) == 7:
            del exc[key]
    return exc


# Strategies are built once, here: building them inside a draw costs hypothesis a
# validation walk per draw (it made 10,000 objects take minutes).
_TIMES = _maybe_hostile(times)
_REASONS = _maybe_hostile(reasons)
EXCEPTIONS = st.one_of(_exception(), _exception(), OTHER_TYPES)
POLICY_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "destinations": _list_of(unit.destination),
    "level": _maybe_hostile(st.sampled_from(LEVELS)),
    "match": _list_of(unit.name_pattern | unit.digest),
    "ciphers": _maybe_hostile(st.sampled_from(["export", "low", "medium", "high", "null"])),
    "protocols": _maybe_hostile(st.sampled_from([">=TLSv1.2", "!SSLv2:!SSLv3", "TLSv1.3",
                                                 "<=TLSv1.3", ">=TLSv1.2:>=TLSv1.3"])),
    "exclude": _list_of(st.sampled_from(["3DES", "aNULL", "RC4", "a.b+c-d"])),
    "tafile": _list_of(unit.path, max_size=9),
    "servername": _maybe_hostile(st.sampled_from(["hostname", "nexthop"]) | unit.domain),
    "connectionReuse": _maybe_hostile(st.booleans()),
    "route": _maybe_hostile(st.just("direct")),
    "instances": _list_of(st.sampled_from(["relay", "edge", "a-b", "Relay", "-x"])),
    "mode": _maybe_hostile(st.sampled_from(["enforce", "audit"])),
    "exception": EXCEPTIONS,
}
_INTERVALS = st.one_of(st.sampled_from([59, 60, 61, 3600, 86400, 86401, 0, -1, 2**63,
                                        3600.0, 3600.5, 1e3, 6e1]),
                       st.integers(-(2**64), 2**64))
DISCOVERY_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "domains": _list_of(unit.destination | unit.domain, max_size=5),
    "sources": _list_of(st.sampled_from(["dane", "mta-sts", "DANE", "mta_sts"]), 3),
    "instances": _list_of(st.sampled_from(["relay", "edge", "a-b", "Relay", "-x"])),
    "checkIntervalSeconds": _maybe_hostile(_INTERVALS),
}
UNIT_SPECS = unit.specs() | unit.schema_valid_specs()


VALID_DESTINATION = st.one_of(
    unit.domain, unit.domain.map(lambda d: "." + d), unit.domain.map(lambda d: f"[{d}]"),
    st.tuples(unit.domain, st.integers(1, 65535)).map(lambda t: f"[{t[0]}]:{t[1]}"),
    st.tuples(unit.domain, st.integers(1, 65535)).map(lambda t: f"{t[0]}:{t[1]}"),
    st.ip_addresses(v=4).map(lambda a: f"[{a}]"), st.ip_addresses(v=6).map(lambda a: f"[ipv6:{a}]"),
    unit.idn)
NAMES = st.sampled_from(["nexthop", "dot-nexthop", "hostname"]) | unit.domain | unit.domain.map(
    lambda d: "." + d)
VALID_PATH = st.from_regex(r"/[a-z0-9._-]{1,12}(/[a-z0-9._-]{1,12}){0,3}", fullmatch=True)
PLAIN = ("ciphers", "protocols", "exclude", "servername", "connectionReuse")
_WINDOW_START = st.datetimes(min_value=datetime(2026, 11, 1), max_value=datetime(2027, 1, 15))
_WINDOW = st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(days=30))
_MUTATIONS = st.sampled_from([1, 0, 2, 1, 0, 3, 0, 1, 0, 1])


@st.composite
def valid_policy_specs(draw: st.DrawFn) -> dict[str, Any]:
    """A spec the server accepts: attributes only where the level allows them."""
    level = draw(st.sampled_from(LEVELS))
    spec: dict[str, Any] = {
        "destinations": draw(st.lists(VALID_DESTINATION, min_size=1, max_size=4, unique=True)),
        "level": level}
    if level == "fingerprint":
        spec["match"] = draw(st.lists(unit.digest, min_size=1, max_size=3))
    elif level in ("verify", "secure") and draw(st.booleans()):
        spec["match"] = draw(st.lists(NAMES, min_size=1, max_size=3))
    if level in ("verify", "secure") and draw(st.booleans()):
        spec["tafile"] = draw(st.lists(VALID_PATH, min_size=1, max_size=3))
    if level != "none":
        for key in PLAIN:
            if draw(st.booleans()):
                spec[key] = draw(PLAIN_VALID[key])
    if all(d[0] not in ".[" and ":" not in d for d in spec["destinations"]) and draw(
            st.booleans()):
        spec["route"] = "direct"
    if draw(st.booleans()):
        spec["instances"] = draw(st.lists(st.sampled_from(["relay", "edge", "a-b"]),
                                          max_size=3, unique=True))
    if draw(st.booleans()):
        spec["mode"] = draw(st.sampled_from(["enforce", "audit"]))
    if draw(st.integers(0, 3)) == 2:
        start = draw(_WINDOW_START)
        spec["exception"] = {"startsAt": f"{start:%Y-%m-%dT%H:%M:%SZ}",
                             "expiresAt": f"{start + draw(_WINDOW):%Y-%m-%dT%H:%M:%SZ}",
                             "reason": draw(st.sampled_from(["INC-1 partner certificate expired",
                                                             "CHG-42 bank.example renews"]))}
    return spec


PLAIN_VALID: dict[str, st.SearchStrategy[Any]] = {
    "ciphers": st.sampled_from(["export", "low", "medium", "high", "null"]),
    "protocols": st.sampled_from([">=TLSv1.2", "!SSLv2:!SSLv3", "TLSv1.3", "<=TLSv1.3",
                                  "!SSLv2:!SSLv3:!TLSv1:!TLSv1.1"]),
    "exclude": st.lists(st.sampled_from(["3DES", "aNULL", "RC4", "a.b+c-d"]), min_size=1,
                        max_size=3),
    "servername": st.sampled_from(["hostname", "nexthop"]) | unit.domain,
    "connectionReuse": st.booleans(),
}


@st.composite
def valid_discovery_specs(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {"domains": draw(st.lists(unit.domain | unit.idn, min_size=1,
                                                     max_size=5, unique=True))}
    if draw(st.booleans()):
        spec["sources"] = draw(st.lists(st.sampled_from(["dane", "mta-sts"]), min_size=1,
                                        max_size=2, unique=True))
    if draw(st.booleans()):
        spec["instances"] = draw(st.lists(st.sampled_from(["relay", "edge", "a-b"]),
                                          max_size=3, unique=True))
    if draw(st.booleans()):
        spec["checkIntervalSeconds"] = draw(st.integers(60, 86400))
    return spec


_EXCEPTION_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "exception.startsAt": _TIMES, "exception.expiresAt": _TIMES,
    "exception.reason": _REASONS}
_EXTRA_FIELDS = ("tafiles", "Level", "extra", "status", "")


# Rare events test an interior value (``== 7``): hypothesis draws the ends of a range
# (0, the maximum) far more often than their share.


def _mutate(draw: st.DrawFn, spec: dict[str, Any],
            fields: dict[str, st.SearchStrategy[Any]]) -> None:
    """Zero to three fields made hostile: another value (hostile string, wrong type,
    implausible) or removed; now and then an unknown field."""
    for _ in range(draw(_MUTATIONS)):
        target = draw(st.sampled_from([*fields, "+extra"]))
        if target == "+extra":
            spec[draw(st.sampled_from(_EXTRA_FIELDS))] = draw(st.sampled_from(["x", None, 1]))
            continue
        where, key = spec, target
        if "." in target:
            if not isinstance(spec.get("exception"), dict):
                continue
            where, key = spec["exception"], target.split(".", 1)[1]
        if draw(st.integers(0, 5)) == 3:
            where.pop(key, None)
        else:
            where[key] = draw(fields[target])


@st.composite
def objects(draw: st.DrawFn) -> dict[str, Any]:
    """A whole object of either kind: a valid spec with zero to three fields made
    hostile (a tenth of the policies from the unit tests' own strategies), now and then
    a spec that is missing or not an object. The name is filled in later (unique per
    file); the envelope is mostly right, so the spec is what is judged."""
    kind = draw(st.sampled_from(KINDS))
    spec: Any
    if kind == "MailTLSDiscovery":
        spec = draw(valid_discovery_specs())
        _mutate(draw, spec, DISCOVERY_FIELDS)
    elif draw(st.integers(0, 9)) == 7:
        spec = draw(UNIT_SPECS)
    else:
        spec = draw(valid_policy_specs())
        _mutate(draw, spec, {**POLICY_FIELDS, **_EXCEPTION_FIELDS})
    if draw(st.integers(0, 39)) == 17:
        spec = draw(OTHER_TYPES)
    obj: dict[str, Any] = {"apiVersion": API_VERSION, "kind": kind, "metadata": {}}
    if draw(st.integers(0, 49)) != 23:
        obj["spec"] = spec
    if draw(st.integers(0, 49)) == 31:
        obj[draw(st.sampled_from(["status", "extra", "Spec"]))] = draw(
            st.sampled_from([{}, {"observedGeneration": 1}, "x", ["y"]]))
    return obj


def draw_many(strategy: st.SearchStrategy[Any], count: int, seed_value: int) -> list[Any]:
    """``count`` examples of ``strategy``, the same ones on every run (a fixed seed)."""
    out: list[Any] = []

    @seed(seed_value)
    @settings(max_examples=count, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value: Any) -> None:
        out.append(copy.deepcopy(value))

    collect()
    return out
