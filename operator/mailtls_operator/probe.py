"""Preflight and audit probes: would a destination pass its TLS policy? (DESIGN.md §10)

A probe runs ``posttls-finger`` (Postfix's own TLS prober, the same TLS
library and the same certificate matching as the smtp(8) client) inside a
Postfix pod through the :class:`~.podrunner.PodRunner` seam, with the policy's
level, match, trust anchors, protocols, cipher grade and SNI, and then judges
from its **output**, not its exit status: ``posttls-finger`` exits 0 against a
server without STARTTLS, after a refused connection and after a failed
certificate check alike.

What ``posttls-finger`` prints (Postfix 3.7, measured against the loopback
sinks; the tests check each):

- ``Connected to H[A]:P`` then the SMTP chat, ``< 250-STARTTLS`` in the EHLO
  reply when STARTTLS is offered (chat lines start with ``< `` or ``> ``);
- ``{Anonymous|Untrusted|Trusted|Verified} TLS connection established to
  H[A]:P: TLSv1.3 with cipher ...``, the one-line TLS summary.  Only
  ``Verified`` means the certificate passed the level's checks (trust *and*
  name for verify/secure, digest for fingerprint, TLSA for dane);
- ``[server ]certificate verification failed for H[A]:P: DETAIL`` before the
  summary when it is not ``Verified``: ``num=62:hostname mismatch`` (wrong
  name), ``self-signed certificate``, ``untrusted issuer ...``, ``num=65:no
  matching DANE TLSA records`` (no trust anchor or digest matched);
- ``Failed to establish session to D via H: connect to ...: Connection
  refused``, ``Destination address lookup failed: ...``, ``timeout while
  reading server greeting``, ``SMTP service not available: 554 ...``;
- ``SSL_connect error to H[A]:P: lost connection`` when the handshake fails
  (e.g. no common protocol version);
- ``fatal: ...`` and exit status 1 for a local problem, e.g. ``Failed to
  load trust anchor file: /missing.pem``.

Decisions:

- The SMTP chat is **kept** (no ``-c``): with ``-c`` a server without STARTTLS
  produces no output at all, so "no STARTTLS" could only be inferred from
  silence.  With the chat the EHLO reply is positive evidence.  ``-c`` only
  suppresses logging; it does not change what is sent.  Server text only ever
  appears in chat lines (``< ...``) or after a fixed prefix, and the parser
  matches anchored patterns on non-chat lines only and splits on ``\\n`` alone,
  so a server cannot forge a ``Verified`` line.
- ``none`` and ``may`` pass whenever the server answers (``PlainAllowed`` or
  ``Encrypted``; a failed ``may`` handshake falls back to plain text in
  Postfix too).  An unreachable server fails at **every** level
  (``Unreachable``/``Timeout``): the probe proved nothing, and mail queues.
- ``dane``/``dane-only`` need DNSSEC lookups in the smtp client
  (``smtp_dns_support_level = dnssec``).  Without them Postfix treats ``dane``
  as ``may`` (clear text when STARTTLS is missing) and defers all mail for
  ``dane-only`` ("client TLS configuration problem"): both are reported as
  ``Fail``/``DNSSECUnavailable``, the ``dane`` one after a ``may`` probe that
  says what Postfix will actually do.  With DNSSEC, ``posttls-finger -l
  dane-only`` is run for both levels (it then says when no TLSA records
  exist, which for ``dane`` means opportunistic TLS).
- A ``.domain`` key names every subdomain, not a host: ``Skipped``/``NotProbeable``.
- The smtp(8) client's defaults that ``posttls-finger`` does not read from
  main.cf are passed explicitly (:class:`ClientDefaults`): the CA file/path
  (``posttls-finger`` trusts no CA by default, so ``verify``/``secure`` against
  a public CA would otherwise always look untrusted), global trust anchors,
  the (mandatory) protocols and cipher grade, and the SNI setting.
- ``exclude`` cannot be probed: ``posttls-finger`` has no option for cipher
  exclusions.  ``connection_reuse`` does not change the outcome.
- When a handshake fails and the policy restricts ``protocols``, the probe is
  repeated without the restriction; if that handshake succeeds the reason is
  ``ProtocolMismatch``, otherwise ``HandshakeFailed``.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import idna

from . import postfix
from .podrunner import ExecResult, PodRef, PodRunner, PodRunnerError

# -- results -------------------------------------------------------------------

PASS: Final = "Pass"
FAIL: Final = "Fail"
SKIPPED: Final = "Skipped"

# Pass reasons
VERIFIED: Final = "Verified"
"""The certificate passed the level's checks (trust + name, digest, or TLSA)."""
ENCRYPTED: Final = "Encrypted"
"""A TLS session was established (``may``/``encrypt``: no certificate checks)."""
PLAIN_ALLOWED: Final = "PlainAllowed"
"""No TLS (not offered, or level ``none``), and the level allows clear text."""

# Fail reasons
NO_STARTTLS: Final = "NoStartTLS"
UNTRUSTED: Final = "Untrusted"
NAME_MISMATCH: Final = "NameMismatch"
FINGERPRINT_MISMATCH: Final = "FingerprintMismatch"
PROTOCOL_MISMATCH: Final = "ProtocolMismatch"
HANDSHAKE_FAILED: Final = "HandshakeFailed"
UNREACHABLE: Final = "Unreachable"
TIMEOUT: Final = "Timeout"
DNSSEC_UNAVAILABLE: Final = "DNSSECUnavailable"
NO_TLSA_RECORDS: Final = "NoTLSARecords"
CONFIG_ERROR: Final = "ConfigError"
"""A local problem Postfix would also defer on, e.g. a missing trust-anchor file."""
ERROR: Final = "Error"

# Skip reason
NOT_PROBEABLE: Final = "NotProbeable"

LEVELS: Final = ("none", "may", "encrypt", "dane", "dane-only", "fingerprint", "verify",
                 "secure")
_TLS_REQUIRED: Final = frozenset({"encrypt", "dane-only", "fingerprint", "verify", "secure"})
_MUST_MATCH: Final = frozenset({"fingerprint", "verify", "secure"})
_MAX_MESSAGE: Final = 1024
PROGRAM: Final = "posttls-finger"


@dataclass(frozen=True)
class ProbeResult:
    """The verdict on one ``posttls-finger`` run: result, CamelCase reason, decisive line."""

    result: str
    reason: str
    message: str

    @property
    def passed(self) -> bool:
        return self.result == PASS


@dataclass(frozen=True)
class ProbeOutcome:
    """One destination (policy key) probed from one pod."""

    destination: str
    result: str
    reason: str
    message: str
    time: datetime
    pod: str = ""

    @property
    def failed(self) -> bool:
        return self.result == FAIL

    @property
    def time_rfc3339(self) -> str:
        return rfc3339(self.time)

    def to_status(self) -> dict[str, str]:
        """The ``status.probes[]`` item (the controller adds the instance)."""
        return {"destination": self.destination, "result": self.result,
                "reason": self.reason, "message": self.message, "time": self.time_rfc3339}


def rfc3339(when: datetime) -> str:
    """``2026-01-02T03:04:05Z``: the form Kubernetes writes."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the policy line -----------------------------------------------------------


class PolicyLike(Protocol):
    """What a probe needs of a policy: its level and its table value."""

    @property
    def level(self) -> str: ...
    @property
    def value(self) -> str: ...


@dataclass(frozen=True)
class TableValue:
    """A TLS policy table value (``LEVEL [name=value ...]``), parsed as Postfix reads it."""

    level: str
    match: tuple[str, ...] = ()
    ciphers: str = ""
    protocols: str = ""
    exclude: str = ""
    tafile: tuple[str, ...] = ()
    servername: str = ""
    connection_reuse: str = ""


_ATTRS: Final = frozenset({"match", "ciphers", "protocols", "exclude", "tafile", "servername",
                           "connection_reuse"})


def parse_value(value: str) -> TableValue:
    """Parse a policy value the way smtp(8) does; raise InvalidArgument on what it refuses.

    ``match`` is split on ``:`` (``|`` for ``fingerprint``, whose digests
    contain colons); ``tafile`` may repeat.
    """
    words = value.split()
    if not words:
        raise postfix.InvalidArgument("empty policy value")
    level = words[0].lower()
    if level not in LEVELS:
        raise postfix.InvalidArgument(f"invalid security level {words[0]!r}")
    attrs: dict[str, Any] = {"tafile": []}
    for word in words[1:]:
        name, sep, val = word.partition("=")
        if not sep or name not in _ATTRS or not val:
            raise postfix.InvalidArgument(f"malformed attribute {word!r} in {value!r}")
        if name == "tafile":
            attrs["tafile"].append(val)
        elif name in attrs:
            raise postfix.InvalidArgument(f"attribute {name!r} repeated in {value!r}")
        elif name == "match":
            sep_char = "|" if level == "fingerprint" else ":"
            attrs["match"] = tuple(m for m in val.split(sep_char) if m)
        else:
            attrs[name] = val
    attrs["tafile"] = tuple(attrs["tafile"])
    return TableValue(level=level, **attrs)


def _value_of(policy: PolicyLike | TableValue | str) -> TableValue:
    if isinstance(policy, TableValue):
        return policy
    return parse_value(policy if isinstance(policy, str) else policy.value)


# -- the smtp client's defaults --------------------------------------------------


CLIENT_PARAMS: Final = ("smtp_tls_CAfile", "smtp_tls_CApath", "smtp_tls_trust_anchor_file",
                        "smtp_tls_protocols", "smtp_tls_mandatory_protocols",
                        "smtp_tls_ciphers", "smtp_tls_mandatory_ciphers",
                        "smtp_tls_servername", "smtp_dns_support_level")


@dataclass(frozen=True)
class ClientDefaults:
    """main.cf settings of the smtp(8) client that decide a TLS session and that
    ``posttls-finger`` does not apply by itself (``postconf -x`` values).

    Empty strings mean "not set": ``posttls-finger``'s own default applies.
    """

    ca_file: str = ""
    ca_path: str = ""
    trust_anchor_files: tuple[str, ...] = ()
    protocols: str = ""
    mandatory_protocols: str = ""
    ciphers: str = ""
    mandatory_ciphers: str = ""
    servername: str = ""
    dns_support_level: str = ""

    @property
    def dnssec(self) -> bool:
        """Whether the smtp client does DNSSEC lookups (needed by ``dane``/``dane-only``)."""
        return self.dns_support_level.strip().lower() == "dnssec"

    @classmethod
    def from_postconf(cls, values: Mapping[str, str]) -> ClientDefaults:
        return cls(
            ca_file=values.get("smtp_tls_CAfile", ""),
            ca_path=values.get("smtp_tls_CApath", ""),
            trust_anchor_files=tuple(p for p in re.split(r"[\s,]+",
                                                         values.get("smtp_tls_trust_anchor_file",
                                                                    ""))
                                     if p),
            protocols=values.get("smtp_tls_protocols", ""),
            mandatory_protocols=values.get("smtp_tls_mandatory_protocols", ""),
            ciphers=values.get("smtp_tls_ciphers", ""),
            mandatory_ciphers=values.get("smtp_tls_mandatory_ciphers", ""),
            servername=values.get("smtp_tls_servername", ""),
            dns_support_level=values.get("smtp_dns_support_level", ""),
        )


class ProbeSetupError(Exception):
    """The pod's Postfix settings could not be read; nothing was probed."""


async def read_client_defaults(runner: PodRunner, pod: PodRef, *,
                               timeout: float = 30.0) -> ClientDefaults:
    """Read :class:`ClientDefaults` from the pod with ``postconf -x``."""
    # Not postfix.postconf_get: its name check refuses upper case, and Postfix's
    # own names have it (smtp_tls_CAfile).  These names are constants.
    res = await runner.run(pod, postfix.postconf_get(CLIENT_PARAMS), timeout=timeout)
    if not res.ok:
        raise ProbeSetupError(f"{pod}: postconf: {res.message()}")
    return ClientDefaults.from_postconf(postfix.parse_postconf(res.stdout.decode("utf-8",
                                                                                 "replace")))


# -- argv ------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeTimeouts:
    """``connect``: TCP connect and banner (``-t``); ``command``: each SMTP command and
    the TLS handshake (``-T``); ``total``: the whole run (default: enough for one
    connect and the four commands of a probe, plus slack)."""

    connect: float = 10.0
    command: float = 20.0
    total: float | None = None

    @property
    def deadline(self) -> float:
        if self.total is not None:
            return self.total
        return 2 * self.connect + 4 * self.command + 5.0


def _word(value: str, what: str) -> str:
    """An argv word from data: non-empty, no leading '-', no whitespace or control chars."""
    if (not value or value.startswith("-")
            or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value)):
        raise postfix.InvalidArgument(f"unsafe {what}: {value!r}")
    return value


def _list_word(value: str, what: str) -> str:
    """Like :func:`_word` but a Postfix list (``!SSLv2, !SSLv3``) may contain blanks."""
    cleaned = " ".join(value.split())
    if not cleaned or cleaned.startswith("-") or any(ord(c) < 32 or ord(c) == 127
                                                     for c in cleaned):
        raise postfix.InvalidArgument(f"unsafe {what}: {value!r}")
    return cleaned


def probe_target(key: str) -> str | None:
    """The ``posttls-finger`` destination for a policy key, or None if it cannot be probed.

    ``[host]:port``, ``[host]``, ``host:port`` and ``host`` are used as they are
    (``posttls-finger`` does the MX lookup for a bare domain, like smtp(8));
    a ``.domain`` key matches subdomains, not one host.  A U-label key is
    probed by its A-label (the same server).
    """
    if not key or key.startswith("."):
        return None
    if key.isascii():
        return key
    host, colon, port = key.rpartition(":") if not key.startswith("[") else (key, "", "")
    if not colon or not port.isdigit():
        host, colon, port = key, "", ""
    try:
        ascii_host = idna.encode(host, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return key
    return f"{ascii_host}{colon}{port}"


def probe_argv(policy_like: PolicyLike | TableValue | str, destination_key: str, *,
               connect_timeout: float, command_timeout: float,
               defaults: ClientDefaults | None = None,
               restrict_protocols: bool = True, chat: bool = True) -> list[str]:
    """``posttls-finger`` argv that probes ``destination_key`` the way smtp(8) would deliver.

    ``policy_like`` is a :class:`~.policy.Policy` (or anything with ``level``
    and ``value``), a table value string, or a :class:`TableValue`.  Options:
    ``-t``/``-T`` timeouts, ``-l LEVEL`` (``dane`` is probed as ``dane-only``, which reports missing
    TLSA records), ``-A`` per trust-anchor file (``verify``/``secure``; the
    policy's ``tafile``, else ``smtp_tls_trust_anchor_file``), ``-F``/``-P``
    from ``smtp_tls_CAfile``/``CApath``, ``-p`` protocols and ``-g`` cipher
    grade (the policy's, else the client's mandatory or opportunistic
    default), ``-s`` SNI; then ``--``, the destination, and the match
    arguments (``verify``/``secure`` names, ``fingerprint`` digests).
    ``chat=False`` adds ``-c`` (no SMTP chat in the output).
    """
    value = _value_of(policy_like)
    target = probe_target(destination_key)
    if target is None:
        raise postfix.InvalidArgument(f"{destination_key!r} cannot be probed (a .domain key)")
    _word(target, "destination")
    d = defaults or ClientDefaults()
    level = value.level
    mandatory = level in _TLS_REQUIRED or level == "dane"
    argv = [PROGRAM, "-t", str(max(1, math.ceil(connect_timeout))),
            "-T", str(max(1, math.ceil(command_timeout)))]
    if not chat:
        argv.append("-c")
    argv += ["-l", "dane-only" if level == "dane" else level]
    if level in ("verify", "secure"):
        for path in value.tafile or d.trust_anchor_files:
            argv += ["-A", _word(path, "trust anchor file")]
    if level != "none":
        if d.ca_file:
            argv += ["-F", _word(d.ca_file, "CA file")]
        if d.ca_path:
            argv += ["-P", _word(d.ca_path, "CA path")]
        protocols = value.protocols or (d.mandatory_protocols if mandatory else d.protocols)
        if protocols and restrict_protocols:
            argv += ["-p", _list_word(protocols, "protocols")]
        grade = value.ciphers or (d.mandatory_ciphers if mandatory else d.ciphers)
        if grade:
            argv += ["-g", _word(grade, "cipher grade")]
        servername = value.servername or d.servername
        if servername:
            argv += ["-s", _word(servername, "servername")]
    argv += ["--", target]
    if level in _MUST_MATCH:
        argv += [_word(m, "match") for m in value.match]
    return argv


# -- reading the output ----------------------------------------------------------


_PREFIX: Final = f"{PROGRAM}: "
_SUMMARY_RE: Final = re.compile(
    r"(?P<trust>Anonymous|Untrusted|Trusted|Verified) TLS connection (?:established|reused) "
    r"to (?P<peer>\S+): (?P<detail>.*)")
_VERIFY_FAIL_RE: Final = re.compile(r"(?:server )?certificate verification failed for "
                                    r"(?P<peer>\S+): (?P<detail>.*)")
_CONNECTED_RE: Final = re.compile(r"Connected to (?P<peer>\S+)")
_SESSION_FAIL_RE: Final = re.compile(r"Failed to establish session to (?P<dest>\S+)(?: via "
                                     r"\S+)?: (?P<detail>.*)")
_LOOKUP_FAIL_RE: Final = re.compile(r"Destination address lookup failed: (?P<detail>.*)")
_GREETING_RE: Final = re.compile(r"(?P<what>timeout|lost connection) while reading server "
                                 r"greeting")
_SERVICE_RE: Final = re.compile(r"SMTP service not available: (?P<detail>.*)")
_EHLO_RE: Final = re.compile(r"(?:EHLO|LHLO) rejected: (?P<detail>.*)")
_EHLO_EXC_RE: Final = re.compile(r"(?P<what>timeout|lost connection) while sending (?:EHLO|LHLO)")
_STARTTLS_REJECT_RE: Final = re.compile(r"STARTTLS rejected: (?P<detail>.*)")
_SSL_ERROR_RE: Final = re.compile(r"SSL_connect error to (?P<peer>\S+): (?P<detail>.*)")
_NO_TLSA_RE: Final = re.compile(r"no (?:usable )?TLSA records found.*")
_DNSSEC_RE: Final = re.compile(r"warning: DNSSEC validation may be unavailable")
_TLSA_ERROR_RE: Final = re.compile(r"TLSA lookup error")
_FATAL_RE: Final = re.compile(r"fatal: (?P<detail>.*)")
_STARTTLS_EHLO_RE: Final = re.compile(r"< 250[- ]STARTTLS\s*$", re.IGNORECASE)
_EHLO_CMD_RE: Final = re.compile(r"> (?:EHLO|LHLO) ")
_TIMEOUT_WORDS: Final = re.compile(r"\btim(?:e|ed) ?out\b", re.IGNORECASE)


def clean(text: str, limit: int = _MAX_MESSAGE) -> str:
    """One printable line of at most ``limit`` characters (for status messages)."""
    out = "".join(c if c.isprintable() else " " for c in text).strip()
    return out if len(out) <= limit else out[:limit - 1] + "…"


@dataclass
class _Output:
    """``posttls-finger`` output split into its own lines and the SMTP chat."""

    lines: list[str] = field(default_factory=list)
    """Non-chat lines, prefix removed, in order."""
    connected: str | None = None
    ehlo_seen: bool = False
    starttls_offered: bool = False
    last_ehlo_line: str = ""

    @classmethod
    def parse(cls, output: str) -> _Output:
        out = cls()
        in_first_ehlo = False
        for raw in output.split("\n"):  # not splitlines(): a server's \r must not split
            line = raw.rstrip("\r")
            if not line.startswith(_PREFIX):
                continue  # e.g. -C output; never classified
            text = line[len(_PREFIX):]
            if text.startswith("> "):
                if _EHLO_CMD_RE.match(text):
                    # only the first EHLO reply (before TLS) shows whether STARTTLS is offered
                    in_first_ehlo = not out.ehlo_seen
                    out.ehlo_seen = True
                else:
                    in_first_ehlo = False
                continue
            if text.startswith("< "):
                if in_first_ehlo:
                    out.last_ehlo_line = text[2:]
                    if _STARTTLS_EHLO_RE.match(text):
                        out.starttls_offered = True
                continue
            m = _CONNECTED_RE.fullmatch(text)
            if m and out.connected is None:
                out.connected = m.group("peer")
                continue
            out.lines.append(text)
        return out

    def find(self, rx: re.Pattern[str]) -> re.Match[str] | None:
        for text in self.lines:
            m = rx.fullmatch(text)
            if m:
                return m
        return None


def _r(result: str, reason: str, message: str) -> ProbeResult:
    return ProbeResult(result, reason, clean(message))


def classify(output: str, exit_status: int, level: str) -> ProbeResult:
    """Judge ``posttls-finger`` output against ``level`` (see the module docstring).

    Works with and without the SMTP chat (``-c``); without it, a clean exit
    with no TLS summary and no error line means the server answered without
    offering STARTTLS (``posttls-finger`` prints nothing else then).
    """
    lvl = level.lower()
    if lvl not in LEVELS:
        raise ValueError(f"unknown TLS security level {level!r}")
    out = _Output.parse(output)

    fatal = out.find(_FATAL_RE)
    if fatal is not None or exit_status != 0:
        detail = fatal.group("detail") if fatal else (out.lines[-1] if out.lines
                                                       else f"exit status {exit_status}")
        if _TIMEOUT_WORDS.search(detail):
            return _r(FAIL, TIMEOUT, detail)
        if re.search(r"trust anchor|Invalid TLS level|usage:|bad .* option", detail):
            return _r(FAIL, CONFIG_ERROR, detail)
        return _r(FAIL, ERROR, detail)

    if lvl in ("dane", "dane-only") and (m := out.find(_DNSSEC_RE)) is not None:
        return _r(FAIL, DNSSEC_UNAVAILABLE, m.group(0))

    m = out.find(_LOOKUP_FAIL_RE)
    if m is not None:
        return _r(FAIL, UNREACHABLE, m.group(0))
    summary = out.find(_SUMMARY_RE)
    if summary is None and out.connected is None:
        m = out.find(_SESSION_FAIL_RE)
        if m is not None:
            tls_a = _TLSA_ERROR_RE.search(m.group("detail"))
            if tls_a and lvl in ("dane", "dane-only"):
                return _r(FAIL, DNSSEC_UNAVAILABLE, m.group(0))
            reason = TIMEOUT if _TIMEOUT_WORDS.search(m.group("detail")) else UNREACHABLE
            return _r(FAIL, reason, m.group(0))
    m = out.find(_GREETING_RE)
    if m is not None:
        return _r(FAIL, TIMEOUT if m.group("what") == "timeout" else UNREACHABLE, m.group(0))
    m = out.find(_SERVICE_RE)
    if m is not None:
        return _r(FAIL, UNREACHABLE, m.group(0))
    m = out.find(_EHLO_EXC_RE)
    if m is not None:
        return _r(FAIL, TIMEOUT if m.group("what") == "timeout" else UNREACHABLE, m.group(0))

    no_tlsa = out.find(_NO_TLSA_RE)
    if no_tlsa is not None and lvl == "dane-only":
        return _r(FAIL, NO_TLSA_RECORDS, no_tlsa.group(0))
    # dane without TLSA records is opportunistic in smtp(8): judge it as "may";
    # with usable TLSA records it is mandatory and must verify.
    as_level = "may" if (lvl == "dane" and no_tlsa is not None) else lvl
    opportunistic = as_level in ("none", "may")
    required = not opportunistic

    if summary is not None:
        line = summary.group(0)
        trust = summary.group("trust")
        if as_level in ("none", "may", "encrypt"):
            return _r(PASS, ENCRYPTED, line)
        if trust == "Verified":
            return _r(PASS, VERIFIED, line)
        failure = out.find(_VERIFY_FAIL_RE)
        if as_level == "fingerprint":
            return _r(FAIL, FINGERPRINT_MISMATCH, failure.group(0) if failure else line)
        if failure is not None:
            detail = failure.group("detail")
            reason = NAME_MISMATCH if "hostname mismatch" in detail else UNTRUSTED
            return _r(FAIL, reason, failure.group(0))
        return _r(FAIL, NAME_MISMATCH if trust == "Trusted" else UNTRUSTED, line)

    m = out.find(_SSL_ERROR_RE)
    if m is not None:
        if opportunistic:
            return _r(PASS, PLAIN_ALLOWED, f"{m.group(0)} (Postfix retries in clear text)")
        reason = TIMEOUT if _TIMEOUT_WORDS.search(m.group("detail")) else HANDSHAKE_FAILED
        return _r(FAIL, reason, m.group(0))
    m = out.find(_STARTTLS_REJECT_RE)
    if m is not None:
        if opportunistic:
            return _r(PASS, PLAIN_ALLOWED, m.group(0))
        return _r(FAIL, NO_STARTTLS, m.group(0))
    m = out.find(_EHLO_RE)
    if m is not None:  # Postfix falls back to HELO: no ESMTP, no STARTTLS
        return _r(FAIL if required else PASS, NO_STARTTLS if required else PLAIN_ALLOWED,
                  m.group(0))

    peer = out.connected or "the server"
    if out.ehlo_seen:
        if out.starttls_offered:
            if lvl == "none":  # posttls-finger -l none has no TLS engine: never tries
                return _r(PASS, PLAIN_ALLOWED, f"{peer} offers STARTTLS; level none sends in "
                                               "clear text")
            message = f"{peer} offers STARTTLS but no TLS session was started"
            return _r(FAIL, ERROR, message) if required else _r(PASS, PLAIN_ALLOWED, message)
        message = f"EHLO reply from {peer} does not offer STARTTLS"
        return _r(FAIL, NO_STARTTLS, message) if required else _r(PASS, PLAIN_ALLOWED, message)
    if not output.strip() or not out.lines:
        # -c: posttls-finger is silent when the server answers without STARTTLS.
        message = "no TLS session: the server did not offer STARTTLS"
        if lvl == "none":
            message = "level none: TLS is not attempted"
        return _r(FAIL, NO_STARTTLS, message) if required else _r(PASS, PLAIN_ALLOWED, message)
    return _r(FAIL, ERROR, f"unrecognised posttls-finger output: {out.lines[-1]}")


# -- running probes ----------------------------------------------------------------


def _outcome(key: str, res: ProbeResult, pod: PodRef | None) -> ProbeOutcome:
    return ProbeOutcome(key, res.result, res.reason, res.message, datetime.now(UTC),
                        str(pod) if pod is not None else "")


async def _run(runner: PodRunner, pod: PodRef, argv: Sequence[str],
               timeouts: ProbeTimeouts) -> ExecResult | ProbeResult:
    """Run one posttls-finger; a transport failure becomes a Fail result."""
    started = time.monotonic()
    deadline = timeouts.deadline
    try:
        return await asyncio.wait_for(runner.run(pod, argv, timeout=deadline), deadline + 10.0)
    except TimeoutError:
        return ProbeResult(FAIL, TIMEOUT, f"posttls-finger did not finish within {deadline:g}s")
    except PodRunnerError as exc:
        text = clean(str(exc))
        if (time.monotonic() - started >= deadline * 0.95 or "did not finish" in text
                or _TIMEOUT_WORDS.search(text)):
            return ProbeResult(FAIL, TIMEOUT, text)
        return ProbeResult(FAIL, ERROR, text)


def _judge(res: ExecResult, level: str) -> ProbeResult:
    if res.returncode in (126, 127) and not res.stdout.strip():
        return ProbeResult(FAIL, ERROR, clean(f"posttls-finger is not available: "
                                              f"{res.message()}"))
    text = res.stdout.decode("utf-8", "replace") + "\n" + res.stderr.decode("utf-8", "replace")
    return classify(text, res.returncode, level)


async def probe_destination(runner: PodRunner, pod: PodRef,
                            policy: PolicyLike | TableValue | str,
                            key: str, *, timeouts: ProbeTimeouts | None = None,
                            defaults: ClientDefaults | None = None) -> ProbeOutcome:
    """Probe one policy key from ``pod``; never raises for what the probe finds.

    ``policy`` is a Policy or a table value (to probe what a table actually
    holds, e.g. the winner of a conflict).  ``defaults`` are the pod's
    :class:`ClientDefaults` (read them once per pod with
    :func:`read_client_defaults`; None means Postfix's built-in defaults, in
    particular no DNSSEC).  The runner runs the argv in the pod, where
    ``posttls-finger`` reads the pod's main.cf (the local runner sets
    ``MAIL_CONFIG``).  Raises ``InvalidArgument`` only for a value or key that
    must never become an argument.
    """
    t = timeouts or ProbeTimeouts()
    d = defaults or ClientDefaults()
    value = _value_of(policy)
    if probe_target(key) is None:
        return _outcome(key, ProbeResult(SKIPPED, NOT_PROBEABLE,
                                         f"{key} matches every subdomain, not one server: "
                                         "probe a concrete destination instead"), pod)
    level = value.level
    if level in ("dane", "dane-only") and not d.dnssec:
        return await _dane_without_dnssec(runner, pod, value, key, t, d)

    argv = probe_argv(value, key, connect_timeout=t.connect, command_timeout=t.command,
                      defaults=d)
    ran = await _run(runner, pod, argv, t)
    if isinstance(ran, ProbeResult):
        return _outcome(key, ran, pod)
    verdict = _judge(ran, level)
    if verdict.reason == HANDSHAKE_FAILED and "-p" in argv:
        verdict = await _protocol_check(runner, pod, value, key, t, d, verdict)
    return _outcome(key, verdict, pod)


async def _protocol_check(runner: PodRunner, pod: PodRef, value: TableValue, key: str,
                          t: ProbeTimeouts, d: ClientDefaults,
                          verdict: ProbeResult) -> ProbeResult:
    """A failed handshake under a protocol restriction: does it succeed without it?"""
    argv = probe_argv(value, key, connect_timeout=t.connect,
                      command_timeout=t.command, defaults=d, restrict_protocols=False)
    ran = await _run(runner, pod, argv, t)
    if isinstance(ran, ProbeResult):
        return verdict
    summary = _Output.parse(ran.stdout.decode("utf-8", "replace")).find(_SUMMARY_RE)
    if summary is None:
        return verdict
    protocols = value.protocols or d.mandatory_protocols or d.protocols
    return ProbeResult(FAIL, PROTOCOL_MISMATCH, clean(
        f"{verdict.message}; without protocols={protocols} the handshake succeeds: "
        f"{summary.group('detail').split(' with cipher')[0]}"))


async def _dane_without_dnssec(runner: PodRunner, pod: PodRef, value: TableValue, key: str,
                               t: ProbeTimeouts, d: ClientDefaults) -> ProbeOutcome:
    setting = f"smtp_dns_support_level = {d.dns_support_level or '(empty)'}"
    if value.level == "dane-only":
        return _outcome(key, ProbeResult(FAIL, DNSSEC_UNAVAILABLE, clean(
            f"{setting}: dane-only needs DNSSEC lookups; Postfix defers all mail for this "
            "destination (client TLS configuration problem)")), pod)
    as_may = replace(value, level="may", match=(), tafile=())
    argv = probe_argv(as_may, key, connect_timeout=t.connect,
                      command_timeout=t.command, defaults=d)
    ran = await _run(runner, pod, argv, t)
    seen = ran if isinstance(ran, ProbeResult) else _judge(ran, "may")
    return _outcome(key, ProbeResult(FAIL, DNSSEC_UNAVAILABLE, clean(
        f"{setting}: dane needs DNSSEC lookups; Postfix uses may instead "
        f"({seen.reason}: {seen.message})")), pod)


class ProbeablePolicy(PolicyLike, Protocol):
    """A policy with its table keys (``policy.Policy``)."""

    @property
    def keys(self) -> tuple[str, ...]: ...


async def probe_policy(runner: PodRunner, pod: PodRef, policy: ProbeablePolicy, *,
                       concurrency: int = 4, timeouts: ProbeTimeouts | None = None,
                       defaults: ClientDefaults | None = None,
                       keys: Iterable[str] | None = None) -> list[ProbeOutcome]:
    """Probe every key of ``policy`` (or ``keys``) from ``pod``, ``concurrency`` at a time.

    Reads the pod's :class:`ClientDefaults` first unless given (raises
    :class:`ProbeSetupError` if ``postconf`` fails).  Keys that reach the
    same server (an IDN's A-label and U-label) are probed once.  Outcomes
    come back in key order.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if defaults is None:
        defaults = await read_client_defaults(runner, pod)
    wanted = list(policy.keys if keys is None else keys)
    sem = asyncio.Semaphore(concurrency)
    by_target: dict[str, asyncio.Task[ProbeOutcome]] = {}

    async def one(key: str) -> ProbeOutcome:
        async with sem:
            return await probe_destination(runner, pod, policy, key, timeouts=timeouts,
                                           defaults=defaults)

    tasks: list[tuple[str, asyncio.Task[ProbeOutcome]]] = []
    for key in wanted:
        target = probe_target(key) or key
        task = by_target.get(target)
        if task is None:
            task = by_target[target] = asyncio.ensure_future(one(key))
        tasks.append((key, task))
    try:
        done = [(key, await task) for key, task in tasks]
    finally:
        for task in by_target.values():
            task.cancel()
    return [out if out.destination == key else replace(out, destination=key)
            for key, out in done]
