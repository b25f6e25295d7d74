"""Stuck mail, seen and released (DESIGN.md §10).

:func:`read_queue` reads a pod's queue with ``postqueue -j`` (one JSON object
per message: ``queue_name``, ``queue_id``, ``arrival_time``, ``sender``,
``recipients[{address, delay_reason}]``, ...); :func:`is_tls_reason` picks the
recipients Postfix deferred for a TLS reason; :func:`governing_key` finds the
TLS policy key that decided their delivery, with the routing Postfix uses
(transport table, then relayhost, then the recipient domain; the policy table
is looked up with the next-hop); :func:`deferred_by_key` groups them per key;
:func:`summarise_for_policy` turns that into ``status.deferred``; and
:func:`release` schedules messages at once with ``postqueue -i ID`` after a
rollout changed their key's line, instead of waiting for Postfix's next retry.

Everything but :func:`read_queue` and :func:`release` is pure.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from . import postfix
from .crd.timefmt import format_rfc3339
from .podrunner import PodRef, PodRunner, PodRunnerError
from .render import REVISION_KEY
from .routing import InstanceConfig, governing_key

# -- records ---------------------------------------------------------------------


@dataclass(frozen=True)
class Recipient:
    """One recipient of a queued message; ``delay_reason`` is empty until a deferral."""

    address: str
    delay_reason: str = ""

    @property
    def domain(self) -> str:
        """The recipient domain, lower-cased (empty for an address without one)."""
        _, at, domain = self.address.rpartition("@")
        return domain.rstrip(".").lower() if at else ""


@dataclass(frozen=True)
class QueueRecord:
    """One message as ``postqueue -j`` reports it."""

    queue_name: str
    queue_id: str
    arrival_time: datetime
    sender: str
    recipients: tuple[Recipient, ...]
    message_size: int = 0
    forced_expire: bool = False


class QueueFormatError(ValueError):
    """``postqueue -j`` output that is not what Postfix writes."""


def _record(obj: Any, lineno: int) -> QueueRecord:
    if not isinstance(obj, dict):
        raise QueueFormatError(f"line {lineno}: not a JSON object")
    try:
        rcpts = obj.get("recipients") or []
        if not isinstance(rcpts, list):
            raise TypeError("recipients is not a list")
        return QueueRecord(
            queue_name=str(obj["queue_name"]),
            queue_id=str(obj["queue_id"]),
            arrival_time=datetime.fromtimestamp(int(obj["arrival_time"]), UTC),
            sender=str(obj.get("sender", "")),
            recipients=tuple(Recipient(str(r["address"]), str(r.get("delay_reason") or ""))
                             for r in rcpts),
            message_size=int(obj.get("message_size") or 0),
            forced_expire=bool(obj.get("forced_expire", False)),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise QueueFormatError(f"line {lineno}: {type(exc).__name__}: {exc}") from None


def parse_queue(text: str) -> list[QueueRecord]:
    """``postqueue -j`` output -> records, in output order; blank lines are skipped."""
    records = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QueueFormatError(f"line {lineno}: invalid JSON: {exc.msg}") from None
        records.append(_record(obj, lineno))
    return records


# -- TLS deferral reasons -----------------------------------------------------------

_SUSPENDED: Final = "delivery temporarily suspended: "
"""qmgr's prefix for mail it did not even try because the destination is throttled."""

# The smtp(8) client's own deferral texts (Postfix 3.7 src/smtp/smtp_proto.c,
# smtp_tls_policy.c; "not trusted" from Postfix <= 2.10), anchored at the start
# so a remote server's reply ("host X said: ...") can never look like one.
_TLS_REASONS: Final = (
    (re.compile(r"TLS is required, but was not offered by host "), "NoStartTLS"),
    (re.compile(r"TLS is required, but host \S+ refused to start TLS: "), "NoStartTLS"),
    (re.compile(r"TLS is required, but our TLS engine is unavailable"), "TLSUnavailable"),
    (re.compile(r"TLS is required, but unavailable"), "TLSUnavailable"),
    (re.compile(r"Server certificate not verified"), "Unverified"),
    (re.compile(r"Server certificate not trusted"), "Untrusted"),
    (re.compile(r"Cannot start TLS: handshake failure"), "HandshakeFailed"),
    (re.compile(r"client TLS configuration problem"), "ConfigError"),
    (re.compile(r"TLSA lookup error for "), "DANE"),
    (re.compile(r"no (?:usable )?TLSA records found"), "DANE"),
    (re.compile(r"non DNSSEC destination"), "DANE"),
    (re.compile(r"(?:lost connection with|conversation with) \S+ (?:timed out )?while "
                r"receiving the STARTTLS response"), "HandshakeFailed"),
)


def tls_reason(delay_reason: str) -> str | None:
    """The kind of TLS deferral (``NoStartTLS``, ``Unverified``, ``HandshakeFailed``,
    ``ConfigError``, ``DANE``, ...) or None if ``delay_reason`` is not a TLS one."""
    text = delay_reason.strip()
    if text.startswith(_SUSPENDED):
        text = text[len(_SUSPENDED):]
    for rx, kind in _TLS_REASONS:
        if rx.match(text):
            return kind
    return None


def is_tls_reason(delay_reason: str) -> bool:
    """Was the recipient deferred because of TLS (policy, certificate, handshake, DANE)?"""
    return tls_reason(delay_reason) is not None


# -- grouping ----------------------------------------------------------------------

UNMATCHED: Final = "(no policy key)"
"""The :func:`deferred_by_key` bucket for TLS deferrals no table key governs (e.g. the
global ``smtp_tls_security_level``, or a table line from outside the operator)."""

RELEASABLE_QUEUES: Final = frozenset({"deferred", "active", "incoming"})
"""Queues whose messages ``postqueue -i`` can schedule; ``hold`` mail waits for a human."""


@dataclass(frozen=True)
class DeferredSummary:
    """TLS-deferred recipients that one policy key governs."""

    recipients: int
    oldest_arrival: datetime
    sample_reason: str
    queue_ids: tuple[str, ...]

    @property
    def messages(self) -> int:
        return len(self.queue_ids)

    def merge(self, other: DeferredSummary) -> DeferredSummary:
        older = self if self.oldest_arrival <= other.oldest_arrival else other
        return DeferredSummary(self.recipients + other.recipients,
                               older.oldest_arrival, older.sample_reason,
                               tuple(sorted(set(self.queue_ids) | set(other.queue_ids))))


def deferred_by_key(records: Iterable[QueueRecord], table_keys: Iterable[str],
                    config: InstanceConfig,
                    transport_entries: Mapping[str, str] | None = None, *,
                    include_unmatched: bool = False) -> dict[str, DeferredSummary]:
    """TLS-deferred recipients grouped by the policy key that governs their next-hop.

    Only recipients with a TLS ``delay_reason`` (:func:`is_tls_reason`) in a
    releasable queue count; ``hold`` is left out.  ``sample_reason`` is the
    reason of the oldest message.  With ``include_unmatched`` the TLS
    deferrals no key governs are under :data:`UNMATCHED`.  Keys sorted.
    """
    keys = frozenset(k for k in table_keys if k != REVISION_KEY)
    by_domain: dict[str, str | None] = {}
    acc: dict[str, tuple[int, datetime, str, set[str]]] = {}
    for rec in records:
        if rec.queue_name not in RELEASABLE_QUEUES:
            continue
        for rcpt in rec.recipients:
            if not rcpt.delay_reason or not is_tls_reason(rcpt.delay_reason):
                continue
            domain = rcpt.domain
            if domain not in by_domain:
                by_domain[domain] = governing_key(domain, keys, config, transport_entries)
            key = by_domain[domain]
            if key is None:
                if not include_unmatched:
                    continue
                key = UNMATCHED
            count, oldest, sample, ids = acc.get(key, (0, rec.arrival_time,
                                                       rcpt.delay_reason, set()))
            if rec.arrival_time < oldest:
                oldest, sample = rec.arrival_time, rcpt.delay_reason
            ids.add(rec.queue_id)
            acc[key] = (count + 1, oldest, sample, ids)
    return {key: DeferredSummary(n, oldest, sample, tuple(sorted(ids)))
            for key, (n, oldest, sample, ids) in sorted(acc.items())}


def merge_deferred(*maps: Mapping[str, DeferredSummary]) -> dict[str, DeferredSummary]:
    """Several pods' (or instances') :func:`deferred_by_key` results as one."""
    out: dict[str, DeferredSummary] = {}
    for m in maps:
        for key, summary in m.items():
            out[key] = out[key].merge(summary) if key in out else summary
    return dict(sorted(out.items()))


def _rfc3339(when: datetime) -> str:
    return format_rfc3339(when)


def _totals(policy_keys: Iterable[str], deferred: Mapping[str, DeferredSummary]
            ) -> DeferredSummary | None:
    total: DeferredSummary | None = None
    for key in dict.fromkeys(policy_keys):
        summary = deferred.get(key)
        if summary is not None:
            total = summary if total is None else total.merge(summary)
    return total


def summarise_for_policy(policy_keys: Iterable[str],
                         deferred_by_key: Mapping[str, DeferredSummary], *,
                         by_instance: Mapping[str, Mapping[str, DeferredSummary]] | None = None,
                         ) -> dict[str, Any]:
    """``status.deferred`` for a policy: its keys' share of ``deferred_by_key``.

    ``{"recipients": N, "messages": M, "oldest": RFC3339, "sampleReason": ...,
    "keys": [{"key", "recipients", "oldest"}...], "byInstance": [{"instance",
    "recipients", "oldest"}...]}``; ``byInstance`` only when ``by_instance``
    (instance name -> that instance's ``deferred_by_key``) is given, listing
    instances with something deferred.  Nothing deferred: ``{"recipients": 0}``.
    Pass the merged map (:func:`merge_deferred`) as ``deferred_by_key`` when
    there are several instances.
    """
    keys = list(dict.fromkeys(policy_keys))
    total = _totals(keys, deferred_by_key)
    if total is None:
        return {"recipients": 0}
    out: dict[str, Any] = {
        "recipients": total.recipients,
        "messages": total.messages,
        "oldest": _rfc3339(total.oldest_arrival),
        "sampleReason": total.sample_reason,
        "keys": [{"key": k, "recipients": s.recipients, "oldest": _rfc3339(s.oldest_arrival)}
                 for k in keys if (s := deferred_by_key.get(k)) is not None],
    }
    if by_instance is not None:
        rows = []
        for name in sorted(by_instance):
            inst_total = _totals(keys, by_instance[name])
            if inst_total is not None:
                rows.append({"instance": name, "recipients": inst_total.recipients,
                             "oldest": _rfc3339(inst_total.oldest_arrival)})
        out["byInstance"] = rows
    return out


# -- pods ------------------------------------------------------------------------------


class QueueCommandError(Exception):
    """``postqueue`` failed in the pod; the message is Postfix's."""


async def read_queue(runner: PodRunner, pod: PodRef, *,
                     timeout: float = 60.0) -> list[QueueRecord]:
    """The pod's queue (``postqueue -j``); raises QueueCommandError or QueueFormatError."""
    res = await runner.run(pod, postfix.postqueue_json(), timeout=timeout)
    if not res.ok:
        raise QueueCommandError(f"{pod}: postqueue -j: {res.message()}")
    return parse_queue(res.stdout.decode("utf-8", "replace"))


@dataclass(frozen=True)
class ReleaseOutcome:
    """One ``postqueue -i ID``.  ``ok`` means Postfix accepted the request; it exits 0
    for an id no longer in the queue too, so delivery shows in the queue or log."""

    queue_id: str
    ok: bool
    message: str = ""


async def release(runner: PodRunner, pod: PodRef, queue_ids: Iterable[str], *,
                  concurrency: int = 4, timeout: float = 30.0) -> list[ReleaseOutcome]:
    """Schedule each message for delivery now (``postqueue -i ID``), in id order.

    Every id is validated (:func:`postfix.check_queue_id`) before anything
    runs: one bad id raises ``InvalidArgument`` and nothing is scheduled.
    Duplicates are released once.  A failing command is reported in its
    outcome, never raised.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    ids = sorted({postfix.check_queue_id(q) for q in queue_ids})
    sem = asyncio.Semaphore(concurrency)

    async def one(qid: str) -> ReleaseOutcome:
        async with sem:
            try:
                res = await runner.run(pod, postfix.postqueue_schedule(qid), timeout=timeout)
            except PodRunnerError as exc:
                return ReleaseOutcome(qid, False, str(exc))
            return ReleaseOutcome(qid, res.ok, "" if res.ok else res.message())

    return list(await asyncio.gather(*(one(q) for q in ids)))


def releasable_ids(deferred: Mapping[str, DeferredSummary], keys: Iterable[str]
                   ) -> Sequence[str]:
    """Queue ids deferred under any of ``keys`` (e.g. the keys whose line a rollout changed)."""
    out: set[str] = set()
    for key in keys:
        summary = deferred.get(key)
        if summary is not None:
            out.update(summary.queue_ids)
    return sorted(out)
