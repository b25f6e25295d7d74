"""The ``posttls-finger`` argv for a policy and destination, every word validated.  Pure."""

from __future__ import annotations

import math
from dataclasses import dataclass

import idna

from .. import postfix
from .results import MUST_MATCH, PROGRAM, TLS_REQUIRED
from .value import ClientDefaults, PolicyLike, TableValue, value_of

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
    value = value_of(policy_like)
    target = probe_target(destination_key)
    if target is None:
        raise postfix.InvalidArgument(f"{destination_key!r} cannot be probed (a .domain key)")
    _word(target, "destination")
    d = defaults or ClientDefaults()
    level = value.level
    mandatory = level in TLS_REQUIRED or level == "dane"
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
    if level in MUST_MATCH:
        argv += [_word(m, "match") for m in value.match]
    return argv
