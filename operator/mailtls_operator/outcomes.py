"""TLS session outcomes from Postfix's TLSRPT datagrams, counted per policy key.  Pure.

The agent's half of issue 26 (docs/tlsrpt.md).  Postfix 3.10 sends one datagram
per TLS handshake towards a next-hop that publishes a TLSRPT policy; the datagram
names the next-hop *host* (``d``: the domain of ``smtp:domain:port``, the host of
``smtp:[host]:port``, never the port, never an IP literal).  Here:

- :func:`session_of` reads one parsed datagram (:mod:`.tlsrpt`) as a
  :class:`Session`: ``success`` or the RFC 8460 result type, and a one-line detail;
- :class:`Attributor` finds the policy key that governed it with the routing of
  the deferred-mail attribution (:mod:`.routing`: relay next-hops, transport
  entries, then Postfix's policy-table lookup): the next-hops this instance can
  use whose host is ``d`` are looked up in the table; one key is the answer, none
  means the global default governed, several (keys differing only by port or
  brackets) is ambiguous and attributed to none;
- :class:`Tally` counts per key, over a rolling window of fixed slots and in
  totals since start (the operator's counter), with each key's last failure and
  last success: counts, never per-message records, and at most ``max_keys`` keys;
- :func:`to_doc` / :func:`from_doc` are the ``outcomes`` part of the agent's
  report annotation, bounded in bytes (failing keys first) and read back as
  untrusted input.
"""

from __future__ import annotations

import ipaddress
import json
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from .crd.timefmt import parse_rfc3339
from .probe.parse import clean
from .routing import InstanceConfig, nexthops, policy_lookup, route_nexthop
from .tlsrpt import RESULT_TYPES, Failure, Report

SUCCESS: Final = "success"
OTHER: Final = "other"
RESULTS: Final = (SUCCESS, *RESULT_TYPES.values(), OTHER)
"""Every result a session can have: the ``result`` label of ``mailtls_tls_sessions_total``."""
LASTING: Final = frozenset({
    "starttls-not-supported", "certificate-host-mismatch", "certificate-not-trusted",
    "certificate-expired", "validation-failure", "sts-policy-invalid", "sts-webpki-invalid",
    "tlsa-invalid", "dnssec-invalid", "dane-required"})
"""Failures that retrying does not heal: the server, its certificate or its DNS must change
(``sts-policy-fetch-error`` and unknown codes may be transient)."""
UNMATCHED: Final = "(no policy key)"
"""The tally's key for sessions no table key governed (the global default level), or whose
next-hop host several keys could have governed."""
MAX_DETAIL: Final = 300
MAX_KEY: Final = 300
MAX_COUNT: Final = 2**53
MAX_DOC_KEYS: Final = 1000
"""Keys read from one report at most (the agent writes far fewer: :data:`DOC_BUDGET`)."""
DOC_BUDGET: Final = 48 * 1024
"""Bytes of the report annotation the outcomes may take (the whole report: 128 KiB)."""


# -- one session --------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """One TLS handshake as Postfix reported it."""

    domain: str
    result: str  # SUCCESS or an RFC 8460 result type (or OTHER)
    detail: str = ""


def describe(failure: Failure) -> str:
    """One bounded line: the type, OpenSSL's reason, the MX and its address, extra text.
    The EHLO reply (``h``) is left out: its size is the remote server's choice."""
    text = failure.result_type if failure.result_type != OTHER \
        else f"{OTHER} (code {failure.code})"
    if failure.reason:
        text += f" ({failure.reason})"
    if failure.receiving_mx or failure.receiving_ip:
        text += f" at {failure.receiving_mx or ''}" + (
            f"[{failure.receiving_ip}]" if failure.receiving_ip else "")
    if failure.additional:
        text += f": {failure.additional}"
    return clean(text, MAX_DETAIL)


def session_of(report: Report) -> Session:
    """The session a datagram reports: its first failure decides (Postfix sends one)."""
    if report.success:
        return Session(report.domain, SUCCESS)
    failure = next((f for p in report.policies for f in p.failures), None)
    if failure is None:
        return Session(report.domain, OTHER, "failed without failure details")
    return Session(report.domain, failure.result_type, describe(failure))


# -- which key governed it ------------------------------------------------------------------


def reported_host(nexthop: str) -> str | None:
    """The name TLSRPT reports a next-hop under: ``[mx.example]:25`` and ``mx.example:25``
    -> ``mx.example``; None for an IP literal (Postfix never reports one, measured)."""
    hop = nexthop.strip().lower()
    if hop.startswith("["):
        host, sep, _ = hop[1:].partition("]")
        if not sep:
            return None
    else:
        host = hop.partition(":")[0]  # an IPv6 address is always bracketed in a next-hop
    host = host.rstrip(".")
    try:
        ipaddress.ip_address(host.removeprefix("ipv6:"))
    except ValueError:
        return host or None
    return None


@dataclass(frozen=True)
class Routes:
    """What decides the governing key: the live table's keys, the audit policies' keys (not
    in the table), the instance's routing facts and its transport entries (the operator's
    and the site's own, recipient domain -> ``transport:nexthop``)."""

    table_keys: frozenset[str] = frozenset()
    audit_keys: frozenset[str] = frozenset()
    config: InstanceConfig = field(default_factory=InstanceConfig)
    transport: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Attribution:
    key: str | None
    """The table key that governed the session; None: the global default, or ambiguous."""
    audit: str | None = None
    """The key of an audit policy that would govern it if it were enforced."""
    ambiguous: bool = False


class Attributor:
    """:meth:`attribute` a reported next-hop host to its key; answers are cached per host
    (at most ``cache`` of them), since the same few hosts recur."""

    def __init__(self, routes: Routes, *, cache: int = 4096) -> None:
        self.routes = routes
        index: dict[str, set[str]] = {}
        hops = [*routes.config.relay_nexthops,
                *(h for e in routes.transport.values() if (h := route_nexthop(e)))]
        for hop in hops:
            host = reported_host(hop)
            if host:
                index.setdefault(host, set()).add(hop)
        self._index = {h: tuple(sorted(v)) for h, v in index.items()}
        self._table = frozenset(k for k in routes.table_keys)
        self._all = self._table | routes.audit_keys
        self._cache: dict[str, Attribution] = {}
        self._cache_max = cache

    def attribute(self, domain: str) -> Attribution:
        host = domain.rstrip(".").lower()
        found = self._cache.get(host)
        if found is None:
            found = self._attribute(host)
            if len(self._cache) >= self._cache_max:
                self._cache.clear()
            self._cache[host] = found
        return found

    def candidates(self, host: str) -> set[str]:
        """The next-hops (verbatim, as the policy table is looked up) reported as ``host``:
        the routes to it, and ``host`` itself when mail to that domain goes to its MX."""
        found = set(self._index.get(host, ()))
        r = self.routes
        if not found or nexthops(host, r.config, r.transport) == (host,):
            found.add(host)
        return found

    def _attribute(self, host: str) -> Attribution:
        hops = self.candidates(host)
        utf8 = self.routes.config.smtputf8
        keys = {k for h in hops if (k := policy_lookup(h, self._table, smtputf8=utf8))}
        key = next(iter(keys)) if len(keys) == 1 else None
        audit = None
        if self.routes.audit_keys:
            would = {k for h in hops if (k := policy_lookup(h, self._all, smtputf8=utf8))}
            if len(would) == 1 and (a := next(iter(would))) in self.routes.audit_keys \
                    and a != key:
                audit = a
        return Attribution(key, audit, len(keys) > 1)


# -- counting -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LastFailure:
    result: str
    detail: str
    at: datetime


@dataclass(frozen=True)
class KeyOutcomes:
    """One key's sessions: in the window and in total (since the agent started)."""

    window: Mapping[str, int]
    total: Mapping[str, int] = field(default_factory=dict)
    last_failure: LastFailure | None = None
    last_success: datetime | None = None

    @property
    def succeeded(self) -> int:
        return self.window.get(SUCCESS, 0)

    @property
    def failed(self) -> int:
        return sum(n for r, n in self.window.items() if r != SUCCESS)

    @property
    def still_failing(self) -> bool:
        """Did the last session fail (no success since the last failure)?"""
        lf = self.last_failure
        return lf is not None and self.failed > 0 and (
            self.last_success is None or lf.at > self.last_success)

    def merge(self, other: KeyOutcomes) -> KeyOutcomes:
        """Two pods' outcomes for one key: counts added, the later last times kept."""
        lf = max((x for x in (self.last_failure, other.last_failure) if x is not None),
                 key=lambda x: x.at, default=None)
        ls = max((x for x in (self.last_success, other.last_success) if x is not None),
                 default=None)
        return KeyOutcomes(_add(self.window, other.window), _add(self.total, other.total),
                           lf, ls)


def _add(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, n in b.items():
        out[k] = out.get(k, 0) + n
    return out


@dataclass
class _Key:
    total: dict[str, int] = field(default_factory=dict)
    last_failure: LastFailure | None = None
    last_success: datetime | None = None


class Tally:
    """Sessions per key over a rolling window of ``slots`` slots, and in total.

    Memory is bounded by ``max_keys`` keys (the least recently seen one is forgotten
    first) times the result types: a session is a count, never a record."""

    def __init__(self, window: float = 3600.0, *, slots: int = 12,
                 max_keys: int = 10_000) -> None:
        if window <= 0 or slots < 1:
            raise ValueError("window must be positive and slots at least 1")
        self.window = window
        self.slot = window / slots
        self.slots = slots
        self.max_keys = max_keys
        self._ring: deque[tuple[int, dict[tuple[str, str], int]]] = deque()
        self._keys: OrderedDict[str, _Key] = OrderedDict()
        self.sessions = 0

    def _slot_of(self, now: datetime) -> int:
        return int(now.timestamp() // self.slot)

    def _expire(self, now: datetime) -> None:
        oldest = self._slot_of(now) - self.slots + 1
        while self._ring and self._ring[0][0] < oldest:
            self._ring.popleft()

    def record(self, key: str, session: Session, now: datetime) -> None:
        self.sessions += 1
        slot = self._slot_of(now)
        self._expire(now)
        if not self._ring or self._ring[-1][0] != slot:
            self._ring.append((slot, {}))
        counts = self._ring[-1][1]
        counts[(key, session.result)] = counts.get((key, session.result), 0) + 1
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key()
            if len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
        state.total[session.result] = state.total.get(session.result, 0) + 1
        if session.result == SUCCESS:
            state.last_success = now
        else:
            state.last_failure = LastFailure(session.result, session.detail, now)

    def snapshot(self, now: datetime) -> dict[str, KeyOutcomes]:
        """Every key with sessions in the window (a key without any is not shown)."""
        self._expire(now)
        window: dict[str, dict[str, int]] = {}
        for _, slot in self._ring:
            for (key, result), n in slot.items():
                per = window.setdefault(key, {})
                per[result] = per.get(result, 0) + n
        out = {}
        for key, counts in window.items():
            state = self._keys.get(key)
            if state is not None:
                out[key] = KeyOutcomes(counts, dict(state.total), state.last_failure,
                                       state.last_success)
        return out


# -- the report document ------------------------------------------------------------------------


def _time(when: datetime) -> str:
    """Milliseconds: a failure and a success in the same second must stay ordered."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class OutcomeReport:
    """What one agent says about its Postfix's TLS sessions."""

    since: datetime
    """When the agent started counting: the totals restart from 0 when this changes."""
    window_seconds: int
    keys: Mapping[str, KeyOutcomes] = field(default_factory=dict)
    socket: str = ""
    """Where the agent receives datagrams ("" while it does not)."""
    error: str = ""
    """Why it does not receive them, if it should."""
    refused: int = 0
    """Datagrams refused unread (garbage, too large, wrong shape), in total."""
    throttled: int = 0
    """Times reading paused because more datagrams came than the rate allows."""
    truncated: bool = False


def _priority(item: tuple[str, KeyOutcomes]) -> tuple[bool, float]:
    _, o = item
    last = max((t for t in (o.last_success, o.last_failure.at if o.last_failure else None)
                if t is not None), default=None)
    return (not o.still_failing, -(last.timestamp() if last else 0.0))


def _key_doc(key: str, o: KeyOutcomes) -> dict[str, Any]:
    doc: dict[str, Any] = {"key": key, "window": dict(sorted(o.window.items())),
                           "total": dict(sorted(o.total.items()))}
    if o.last_failure is not None:
        doc["lastFailure"] = {"result": o.last_failure.result,
                              "detail": o.last_failure.detail, "at": _time(o.last_failure.at)}
    if o.last_success is not None:
        doc["lastSuccess"] = _time(o.last_success)
    return doc


def to_doc(report: OutcomeReport, *, budget: int = DOC_BUDGET) -> dict[str, Any]:
    """The report's ``outcomes`` object: keys still failing first, then the most recently
    active, as many as ``budget`` bytes hold (``truncated`` says when some were left out)."""
    doc: dict[str, Any] = {"since": _time(report.since), "windowSeconds": report.window_seconds,
                           "socket": report.socket, "error": report.error,
                           "refused": report.refused, "throttled": report.throttled}
    size, keys, truncated = len(json.dumps(doc)) + 40, [], report.truncated
    for key, o in sorted(report.keys.items(), key=_priority):
        item = _key_doc(key, o)
        cost = len(json.dumps(item, separators=(",", ":"))) + 1
        if size + cost > budget:
            truncated = True
            break
        keys.append(item)
        size += cost
    doc["keys"], doc["truncated"] = keys, truncated
    return doc


def _count(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"count must be an integer 0..{MAX_COUNT}")
    return value


def _counts(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ValueError("counts are not an object")
    out = {}
    for result, n in value.items():
        if result not in RESULTS:
            raise ValueError(f"unknown result {str(result)[:40]!r}")
        out[result] = _count(n)
    return out


def _text(value: Any, limit: int) -> str:
    if not isinstance(value, str):
        raise ValueError("not a string")
    return clean(value, limit)


def _key_outcomes(doc: Any) -> tuple[str, KeyOutcomes]:
    if not isinstance(doc, dict):
        raise ValueError("a key's outcomes are not an object")
    key = doc["key"]
    if not isinstance(key, str) or not key or len(key) > MAX_KEY or not key.isprintable():
        raise ValueError("key is not a printable string of 1..300 characters")
    lf = doc.get("lastFailure")
    last_failure = None
    if lf is not None:
        if not isinstance(lf, dict) or lf.get("result") not in RESULTS[1:]:
            raise ValueError("lastFailure is not a failure")
        last_failure = LastFailure(lf["result"], _text(lf.get("detail", ""), MAX_DETAIL),
                                   parse_rfc3339(lf["at"]))
    ls = doc.get("lastSuccess")
    return key, KeyOutcomes(_counts(doc["window"]), _counts(doc.get("total", {})),
                            last_failure, parse_rfc3339(ls) if ls is not None else None)


def from_doc(doc: Any) -> OutcomeReport:
    """The operator's reading of a pod's ``outcomes``; ValueError (or KeyError, TypeError)
    for anything that is not one: counts bounded, results known, times aware, text cleaned."""
    if not isinstance(doc, dict):
        raise ValueError("outcomes is not an object")
    items = doc.get("keys", [])
    if not isinstance(items, list) or len(items) > MAX_DOC_KEYS:
        raise ValueError(f"outcomes.keys is not a list of at most {MAX_DOC_KEYS}")
    keys: dict[str, KeyOutcomes] = {}
    for item in items:
        key, o = _key_outcomes(item)
        keys[key] = keys[key].merge(o) if key in keys else o
    window = _count(doc["windowSeconds"])
    return OutcomeReport(parse_rfc3339(doc["since"]), window, keys,
                         _text(doc.get("socket", ""), 1024), _text(doc.get("error", ""), 1024),
                         _count(doc.get("refused", 0)), _count(doc.get("throttled", 0)),
                         doc.get("truncated") is True)


def merge_keys(reports: Iterable[OutcomeReport]) -> dict[str, KeyOutcomes]:
    """Several pods' outcomes of one instance, per key."""
    out: dict[str, KeyOutcomes] = {}
    for report in reports:
        for key, o in report.keys.items():
            out[key] = out[key].merge(o) if key in out else o
    return out
