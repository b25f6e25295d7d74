"""MTA-STS (RFC 8461): the TXT record, the policy file, MX patterns -> Postfix ``match=``.

Pure: text in, frozen values or :class:`StsError` out.  What RFC 8461 leaves
to the sender is decided here once: a TXT answer with not exactly one
``v=STSv1`` record means "no policy" (§3.1), unknown policy keys are ignored,
the first occurrence of a repeated key wins (except ``mx``), ``max_age`` is
capped at one year (§3.2).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

MAX_AGE_CAP = 31_557_600
"""RFC 8461 §3.2: max_age is at most 31557600 seconds (about one year)."""

MAX_POLICY_BYTES = 64 * 1024
"""RFC 8461 §3.3 suggests senders refuse policy bodies above 64 KiB."""

MODES = ("enforce", "testing", "none")

_TXT_FIELD = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,31})=([\x21-\x3a\x3c\x3e-\x7e]+)")
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"{_LABEL}(\.{_LABEL})+")
_MAX_AGE = re.compile(r"[0-9]{1,10}")


class StsError(ValueError):
    """The record or policy is not valid MTA-STS; the message says why."""


@dataclass(frozen=True)
class StsRecord:
    """The ``_mta-sts`` TXT record: only ``id`` matters to a sender."""

    id: str


@dataclass(frozen=True)
class StsPolicy:
    """A parsed policy file."""

    mode: str
    max_age: int
    mx: tuple[str, ...]


def parse_txt(records: Iterable[str]) -> StsRecord:
    """The TXT strings at ``_mta-sts.<domain>`` (each already concatenated) -> the record.

    RFC 8461 §3.1: records not starting with ``v=STSv1`` are discarded; if not
    exactly one remains, or it is malformed, the domain has no usable policy.
    """
    candidates = [r for r in records if r.startswith("v=STSv1")]
    if len(candidates) != 1:
        raise StsError(f"{len(candidates)} TXT records start with v=STSv1; exactly 1 is needed")
    text = candidates[0]
    fields = [f.strip(" \t") for f in text.split(";")]
    if fields and fields[-1] == "":
        fields.pop()  # an optional trailing ";"
    if not fields or fields[0] != "v=STSv1":
        raise StsError(f"TXT record {text!r}: must begin with v=STSv1;")
    ident: str | None = None
    for item in fields[1:]:
        m = _TXT_FIELD.fullmatch(item)
        if m is None:
            raise StsError(f"TXT record {text!r}: malformed field {item!r}")
        if m.group(1) == "id" and ident is None:
            ident = m.group(2)
    if ident is None or not _ID.fullmatch(ident):
        raise StsError(f"TXT record {text!r}: id must be 1-32 letters or digits")
    return StsRecord(ident)


def _mx_pattern(raw: str) -> str:
    pattern = raw.lower().rstrip(".")
    host = pattern[2:] if pattern.startswith("*.") else pattern
    if not _HOST.fullmatch(host) or len(host) > 253:
        raise StsError(f"mx {raw!r}: not a host name or *.host name pattern")
    return pattern


def parse_policy(body: str) -> StsPolicy:
    """The body of ``mta-sts.txt`` -> :class:`StsPolicy` (RFC 8461 §3.2).

    Lines are ``key: value`` separated by LF or CRLF; ``version: STSv1``,
    ``mode`` and ``max_age`` are required, ``mx`` too unless the mode is
    ``none``.  Unknown keys are ignored (extensions).
    """
    first: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(body.replace("\r\n", "\n").split("\n"), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise StsError(f"line {number}: {line[:60]!r} is not 'key: value'")
        key, value = key.strip(), value.strip(" \t")
        if key == "mx":
            mx.append(_mx_pattern(value))
        else:
            first.setdefault(key, value)
    if first.get("version") != "STSv1":
        raise StsError(f"version must be STSv1, not {first.get('version')!r}")
    mode = first.get("mode")
    if mode not in MODES:
        raise StsError(f"mode must be enforce, testing or none, not {mode!r}")
    age_text = first.get("max_age", "")
    if not _MAX_AGE.fullmatch(age_text):
        raise StsError(f"max_age must be 1-10 digits, not {age_text!r}")
    if mode != "none" and not mx:
        raise StsError(f"mode {mode} needs at least one mx pattern")
    return StsPolicy(mode=mode, max_age=min(int(age_text), MAX_AGE_CAP),
                     mx=tuple(dict.fromkeys(mx)))


def mx_to_match(patterns: Iterable[str]) -> tuple[str, ...]:
    """MX patterns -> Postfix ``match=`` names.

    ``mx1.example.net`` stays as it is; ``*.example.net`` becomes
    ``.example.net``.  Postfix's leading-dot form matches *any* depth below
    the parent (``a.b.example.net`` too), RFC 8461 §4.1 only one label: the
    table is therefore a little wider than the policy, never narrower.
    """
    out: list[str] = []
    for pattern in patterns:
        out.append(pattern[1:] if pattern.startswith("*.") else pattern)
    return tuple(dict.fromkeys(out))


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1 matching of an MX host name: a wildcard covers exactly one label."""
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, tail = host.partition(".")
        return bool(head) and tail == pattern[2:]
    return host == pattern
