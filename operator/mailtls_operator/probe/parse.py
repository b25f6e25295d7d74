"""Reading ``posttls-finger`` output: a verdict from what it printed, never its exit
status (it exits 0 after most failures).  Pure: anchored patterns on non-chat lines."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from .results import (
    CONFIG_ERROR,
    DNSSEC_UNAVAILABLE,
    ENCRYPTED,
    ERROR,
    FAIL,
    FINGERPRINT_MISMATCH,
    HANDSHAKE_FAILED,
    LEVELS,
    MAX_MESSAGE,
    NAME_MISMATCH,
    NO_STARTTLS,
    NO_TLSA_RECORDS,
    PASS,
    PLAIN_ALLOWED,
    PROGRAM,
    TIMEOUT,
    UNREACHABLE,
    UNTRUSTED,
    VERIFIED,
    ProbeResult,
)

# -- reading the output ----------------------------------------------------------


_PREFIX: Final = f"{PROGRAM}: "
SUMMARY_RE: Final = re.compile(
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
TIMEOUT_WORDS: Final = re.compile(r"\btim(?:e|ed) ?out\b", re.IGNORECASE)


def clean(text: str, limit: int = MAX_MESSAGE) -> str:
    """One printable line of at most ``limit`` characters (for status messages)."""
    out = "".join(c if c.isprintable() else " " for c in text).strip()
    return out if len(out) <= limit else out[:limit - 1] + "…"


@dataclass
class Output:
    """``posttls-finger`` output split into its own lines and the SMTP chat."""

    lines: list[str] = field(default_factory=list)
    """Non-chat lines, prefix removed, in order."""
    connected: str | None = None
    ehlo_seen: bool = False
    starttls_offered: bool = False
    last_ehlo_line: str = ""

    @classmethod
    def parse(cls, output: str) -> Output:
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
    out = Output.parse(output)

    fatal = out.find(_FATAL_RE)
    if fatal is not None or exit_status != 0:
        detail = fatal.group("detail") if fatal else (out.lines[-1] if out.lines
                                                       else f"exit status {exit_status}")
        if TIMEOUT_WORDS.search(detail):
            return _r(FAIL, TIMEOUT, detail)
        if re.search(r"trust anchor|Invalid TLS level|usage:|bad .* option", detail):
            return _r(FAIL, CONFIG_ERROR, detail)
        return _r(FAIL, ERROR, detail)

    if lvl in ("dane", "dane-only") and (m := out.find(_DNSSEC_RE)) is not None:
        return _r(FAIL, DNSSEC_UNAVAILABLE, m.group(0))

    m = out.find(_LOOKUP_FAIL_RE)
    if m is not None:
        return _r(FAIL, UNREACHABLE, m.group(0))
    summary = out.find(SUMMARY_RE)
    if summary is None and out.connected is None:
        m = out.find(_SESSION_FAIL_RE)
        if m is not None:
            tls_a = _TLSA_ERROR_RE.search(m.group("detail"))
            if tls_a and lvl in ("dane", "dane-only"):
                return _r(FAIL, DNSSEC_UNAVAILABLE, m.group(0))
            reason = TIMEOUT if TIMEOUT_WORDS.search(m.group("detail")) else UNREACHABLE
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
        reason = TIMEOUT if TIMEOUT_WORDS.search(m.group("detail")) else HANDSHAKE_FAILED
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
