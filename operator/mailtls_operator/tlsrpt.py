"""One TLSRPT datagram, as libtlsrpt sends it from Postfix, read as untrusted input.  Pure.

The format was measured on Postfix 3.10.13 with libtlsrpt 0.5.0rc1 (docs/tlsrpt.md):
one JSON object per datagram, ``{"d", "pr", "policies": [{"policy-type",
"policy-domain", "failure-details": [{"c", "s", "n", "h", "r", "a", "f"}], "t",
"f"}]}``, with ``"dpv": "1"`` in front from libtlsrpt 0.5.1 on.

Anyone who can write the socket can send anything, and the real collector
dies on one wrong-shaped datagram (measured).  So :func:`parse` is total: it
maps any bytes to a :class:`Report` or a :class:`Refusal` naming the reason.
It bounds the size before decoding and the depth before parsing (through
:mod:`.strictjson`), checks every field's type (a JSON ``true`` is no count),
and keeps the domain only if it is a plain DNS name, because the domain is what
a result is attributed by.  It never raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from . import strictjson

MAX_DATAGRAM = 65536
"""Largest datagram read (measured ones are 135-387 bytes; the EHLO reply is the
only part whose size the remote server controls)."""
MAX_DEPTH = 5
"""object > policies > policy > failure-details > failure: what libtlsrpt writes."""
MAX_POLICIES = 8
MAX_FAILURES = 32
MAX_TEXT = 4096

POLICY_TYPES = {1: "tlsa", 2: "sts", 9: "no-policy-found"}
RESULT_TYPES = {
    201: "starttls-not-supported", 202: "certificate-host-mismatch",
    203: "certificate-not-trusted", 204: "certificate-expired", 205: "validation-failure",
    301: "sts-policy-fetch-error", 302: "sts-policy-invalid", 303: "sts-webpki-invalid",
    304: "tlsa-invalid", 305: "dnssec-invalid", 306: "dane-required",
}
"""RFC 8460 result types by libtlsrpt's codes; any other code reads as ``other``."""

TLSRPT_PARAMS: Final = ("smtp_tlsrpt_enable", "smtp_tlsrpt_socket_name",
                         "smtp_tls_security_level", "smtp_dns_support_level", "queue_directory")
"""What an instance's facts carry about TLSRPT: a Postfix without it (before 3.10, or built
without libtlsrpt) does not know ``smtp_tlsrpt_enable`` at all."""


def socket_name_problem(name: str) -> str | None:
    """Why ``smtp_tlsrpt_socket_name`` cannot be collected from, or None.  Postfix takes it
    relative to the queue directory (an absolute one is seen from the smtp(8) chroot
    there, where it runs chrooted), and TLSRPT_README keeps it out of ``private/`` and
    ``public/``, which belong to Postfix's own services."""
    if not name.strip():
        return "smtp_tlsrpt_socket_name is empty"
    parts = [p for p in name.strip().split("/") if p not in ("", ".")]
    if name.startswith("/"):
        return None
    if ".." in parts:
        return f"smtp_tlsrpt_socket_name = {name} leaves the queue directory"
    if parts and parts[0] in ("private", "public"):
        return (f"smtp_tlsrpt_socket_name = {name} is under {parts[0]}/, which Postfix "
                "reserves for its own services")
    return None


_DOMAIN = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?\Z")


@dataclass(frozen=True)
class Failure:
    """One failure detail of a policy."""

    code: int
    result_type: str  # RFC 8460 name, or "other"
    receiving_mx: str | None
    receiving_ip: str | None
    sending_ip: str | None
    reason: str | None  # libtlsrpt's "f": e.g. OpenSSL's "self-signed_certificate"
    additional: str | None
    ehlo: str | None


@dataclass(frozen=True)
class PolicyResult:
    """One policy's outcome for the session: success, or failures."""

    policy_type: str
    policy_domain: str | None
    success: bool
    failures: tuple[Failure, ...]


@dataclass(frozen=True)
class Report:
    """One datagram: the session's domain, its TLSRPT record, its policies' outcomes."""

    domain: str
    record: str
    version: str | None  # "dpv"; absent before libtlsrpt 0.5.1
    policies: tuple[PolicyResult, ...]

    @property
    def success(self) -> bool:
        return all(p.success for p in self.policies)


@dataclass(frozen=True)
class Refusal:
    """Why a datagram was not read."""

    reason: str


class _Bad(Exception):
    pass


def parse(data: object) -> Report | Refusal:
    """``data`` (the bytes of one datagram) as a :class:`Report`, or why not."""
    try:
        return _parse(data)
    except _Bad as exc:
        return Refusal(str(exc))
    except Exception as exc:  # total by contract: a bug must not kill the reader
        return Refusal(f"unreadable: {type(exc).__name__}")


def _parse(data: object) -> Report:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _Bad(f"not bytes but {type(data).__name__}")
    raw = bytes(data)
    if len(raw) > MAX_DATAGRAM:
        raise _Bad(f"datagram of {len(raw)} bytes is over {MAX_DATAGRAM}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad("not UTF-8") from None
    try:
        doc = strictjson.loads(text, max_bytes=MAX_DATAGRAM, max_depth=MAX_DEPTH)
    except ValueError as exc:
        raise _Bad(f"not JSON: {str(exc)[:120]}") from None
    top = _object(doc, "datagram")
    version = _opt_text(top, "dpv")
    if version is not None and version != "1":
        raise _Bad(f"datagram protocol version {version[:20]!r} is not 1")
    domain = _text(top, "d")
    if not _DOMAIN.match(domain):
        raise _Bad("d is not a domain name")
    policies = _list(top, "policies", MAX_POLICIES)
    if not policies:
        raise _Bad("policies is empty")
    return Report(domain.rstrip(".").lower(), _text(top, "pr"), version,
                  tuple(_policy(_object(p, "policy")) for p in policies))


def _policy(obj: dict[str, Any]) -> PolicyResult:
    kind = _int(obj, "policy-type")
    if kind not in POLICY_TYPES:
        raise _Bad(f"policy-type {kind} is unknown")
    for key in ("policy-string", "mx-host"):
        for item in _list(obj, key, MAX_FAILURES, optional=True):
            if not isinstance(item, str) or len(item) > MAX_TEXT:
                raise _Bad(f"{key} holds a non-string or an overlong one")
    final = _int(obj, "f")
    if final not in (0, 1):
        raise _Bad(f"policy f is {final}, not 0 or 1")
    details = _list(obj, "failure-details", MAX_FAILURES, optional=True)
    if _int(obj, "t") != len(details):
        raise _Bad("policy t does not count its failure-details")
    failures = tuple(_failure(_object(d, "failure detail")) for d in details)
    return PolicyResult(POLICY_TYPES[kind], _opt_text(obj, "policy-domain"),
                        final == 0 and not failures, failures)


def _failure(obj: dict[str, Any]) -> Failure:
    code = _int(obj, "c")
    return Failure(code, RESULT_TYPES.get(code, "other"),
                   receiving_mx=_opt_text(obj, "n"),
                   receiving_ip=_opt_text(obj, "r"),
                   sending_ip=_opt_text(obj, "s"),
                   reason=_opt_text(obj, "f"),
                   additional=_opt_text(obj, "a"),
                   ehlo=_opt_text(obj, "h"))


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"{what} is not an object")
    return value


def _list(obj: dict[str, Any], key: str, limit: int, *, optional: bool = False) -> list[Any]:
    if optional and key not in obj:
        return []
    value = obj.get(key)
    if not isinstance(value, list):
        raise _Bad(f"{key} is not a list")
    if len(value) > limit:
        raise _Bad(f"{key} has {len(value)} entries, over {limit}")
    return value


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if type(value) is not int:  # bool is an int subclass: true is no count
        raise _Bad(f"{key} is not an integer")
    return value


def _opt_text(obj: dict[str, Any], key: str) -> str | None:
    return _text(obj, key) if key in obj else None


def _text(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _Bad(f"{key} is not a string")
    if len(value) > MAX_TEXT:
        raise _Bad(f"{key} is longer than {MAX_TEXT} characters")
    return value
