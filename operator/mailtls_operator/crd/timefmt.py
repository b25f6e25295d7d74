"""RFC 3339 times exactly as far as the API server goes, and never an overflow.

Two checks stand between a user's time and the cluster, and they differ:

- the schema's ``format: date-time`` (k8s.io/kube-openapi ``strfmt.IsDateTime``):
  lower-cases the text, splits it at ``t``, wants a valid ``YYYY-MM-DD`` before the
  first ``t`` and ``HH:MM:SS(.<digits>)?(z|+HH:MM|-HH:MM)`` after it, with
  ``HH <= 23``, ``MM <= 59``, ``SS <= 59`` (no leap second ``60``); the separator
  before the fraction is *any* character and the offset is not range-checked;
- CEL's ``timestamp()`` (cel-go: Go's ``time.Parse(time.RFC3339, ...)``), which our
  exception rule applies to both ends of the window: upper-case ``T`` and ``Z``,
  offset hours 0-23, a ``.`` or ``,`` fraction of any length (nanoseconds kept),
  and the instant, in UTC, within 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z.

So a time the model uses is parsed with :func:`parse_rfc3339` (the CEL reading,
the stricter one): every value it returns is a valid aware UTC ``datetime``, and
it never raises anything but :class:`ValueError` with a one-line reason.  Nothing
downstream adds to a parsed time without a check (``datetime.max`` is within a
second of what the API server lets through).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

_KUBE_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})", re.ASCII)
_KUBE_TIME = re.compile(r"([0-9]{2}):([0-9]{2}):([0-9]{2})(.[0-9]+)?(z|[+-][0-9]{2}:[0-9]{2})",
                        re.ASCII | re.DOTALL)
_GO_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:[.,]([0-9]+))?(Z|([+-])([0-9]{2}):([0-9]{2}))", re.ASCII)

_NS = 1_000_000_000


def is_kube_datetime(text: str) -> bool:
    """The schema's ``format: date-time`` as kube-openapi judges it (see the module)."""
    return isinstance(text, str) and _is_kube_datetime(text)


@functools.lru_cache(maxsize=4096)
def _is_kube_datetime(text: str) -> bool:
    """kube-openapi's check itself, cached: the same few times recur across policies."""
    if len(text) < 4:
        return False
    parts = text.lower().split("t")
    if len(parts) < 2:
        return False
    d = _KUBE_DATE.fullmatch(parts[0])
    if d is None:
        return False
    try:
        date(int(d.group(1)), int(d.group(2)), int(d.group(3)))
    except ValueError:
        if d.group(1) != "0000":  # Go's year 0 is a valid date; Python's is not
            return False
        if not (1 <= int(d.group(2)) <= 12 and 1 <= int(d.group(3)) <= 31):
            return False
        try:  # year 0 is a leap year in Go's proleptic calendar, like year 2000
            date(2000, int(d.group(2)), int(d.group(3)))
        except ValueError:
            return False
    t = _KUBE_TIME.fullmatch(parts[1])
    return t is not None and t.group(1) <= "23" and t.group(2) <= "59" and t.group(3) <= "59"


@dataclass(frozen=True, order=True, slots=True)
class Instant:
    """A point in time to the nanosecond, as CEL holds it: ``utc`` (to the microsecond,
    aware) and the nanoseconds of its second.  Ordered like the instants."""

    utc: datetime
    nanos: int

    def minus(self, other: Instant) -> int:
        """``self - other`` in nanoseconds (exact; Python ints do not overflow)."""
        micro = (self.utc - other.utc) // timedelta(microseconds=1)
        return micro * 1000 + self.nanos % 1000 - other.nanos % 1000


def parse_instant(text: str) -> Instant:
    """CEL's ``timestamp(text)``; raises :class:`ValueError` saying why not (also for a
    value that is not a string)."""
    if not isinstance(text, str):
        raise ValueError(f"not a string but {type(text).__name__}")
    return _parse_instant(text)


@functools.lru_cache(maxsize=4096)
def _parse_instant(text: str) -> Instant:
    """Cached: the same few times (a burst's creationTimestamps, an exception window)
    recur per policy in the schema, the CEL twin and the model; a refusal raises, so it
    is not cached."""
    m = _GO_RFC3339.fullmatch(text)
    if m is None:
        raise ValueError("not an RFC 3339 date-time (YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM))")
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError("hour, minute or second out of range (no leap second)")
    frac = m.group(7) or ""
    nanos = int((frac + "000000000")[:9])
    offset = 0
    if m.group(8) != "Z":
        off_h, off_m = int(m.group(10)), int(m.group(11))
        if off_h > 23 or off_m > 59:
            raise ValueError("time zone offset out of range")
        offset = (off_h * 60 + off_m) * (1 if m.group(9) == "+" else -1)
    try:
        local = datetime(year, month, day, hour, minute, second, nanos // 1000)
        utc = (local - timedelta(minutes=offset)).replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise ValueError("outside 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z "
                         "(the range of a Kubernetes timestamp)") from None
    return Instant(utc, nanos)


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 time the API server accepts -> an aware UTC datetime (microseconds:
    the nanoseconds beyond are dropped); raises :class:`ValueError` saying why not."""
    return parse_instant(text).utc


def format_rfc3339(when: datetime) -> str:
    """``2026-01-02T03:04:05Z`` (seconds, UTC; naive means UTC), the year always four
    digits: ``strftime("%Y")`` writes year 1 as ``1``, which the API server refuses."""
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return when.replace(microsecond=0, tzinfo=None).isoformat() + "Z"


def add_capped(when: datetime, delta: timedelta) -> datetime:
    """``when + delta``, saturating at ``datetime.max``/``min`` (UTC) instead of raising
    OverflowError: "never" and "always" are what a time past year 9999 means here."""
    try:
        return when + delta
    except OverflowError:
        edge = datetime.max if delta > timedelta(0) else datetime.min
        return edge.replace(tzinfo=when.tzinfo)
