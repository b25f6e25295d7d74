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
  matches anchored patterns on non-chat lines only and splits on ``\n`` alone,
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
  exclusions.  ``connection_reuse`` and ``enable_rpk`` do not change the outcome.
- When a handshake fails and the policy restricts ``protocols``, the probe is
  repeated without the restriction; if that handshake succeeds the reason is
  ``ProtocolMismatch``, otherwise ``HandshakeFailed``.

Layout: :mod:`.results` (verdicts), :mod:`.value` (the policy line, the client's
defaults), :mod:`.argv` and :mod:`.parse` are pure; :mod:`.run` runs probes in a pod.
"""

from __future__ import annotations

from .argv import (
    ProbeTimeouts,
    probe_argv,
    probe_target,
)
from .parse import (
    classify,
    clean,
)
from .results import (
    CONFIG_ERROR,
    DNSSEC_UNAVAILABLE,
    ENCRYPTED,
    ERROR,
    FAIL,
    FINGERPRINT_MISMATCH,
    HANDSHAKE_FAILED,
    LEVELS,
    NAME_MISMATCH,
    NO_STARTTLS,
    NO_TLSA_RECORDS,
    NOT_PROBEABLE,
    PASS,
    PLAIN_ALLOWED,
    PROGRAM,
    PROTOCOL_MISMATCH,
    SKIPPED,
    TIMEOUT,
    UNREACHABLE,
    UNTRUSTED,
    VERIFIED,
    ProbeOutcome,
    ProbeResult,
    rfc3339,
)
from .run import (
    ProbeablePolicy,
    ProbeSetupError,
    probe_destination,
    probe_policy,
    read_client_defaults,
)
from .value import (
    CLIENT_PARAMS,
    ClientDefaults,
    PolicyLike,
    TableValue,
    parse_value,
    value_of,
)

__all__ = [
    "CLIENT_PARAMS",
    "CONFIG_ERROR",
    "DNSSEC_UNAVAILABLE",
    "ENCRYPTED",
    "ERROR",
    "FAIL",
    "FINGERPRINT_MISMATCH",
    "HANDSHAKE_FAILED",
    "LEVELS",
    "NAME_MISMATCH",
    "NOT_PROBEABLE",
    "NO_STARTTLS",
    "NO_TLSA_RECORDS",
    "PASS",
    "PLAIN_ALLOWED",
    "PROGRAM",
    "PROTOCOL_MISMATCH",
    "SKIPPED",
    "TIMEOUT",
    "UNREACHABLE",
    "UNTRUSTED",
    "VERIFIED",
    "ClientDefaults",
    "PolicyLike",
    "ProbeOutcome",
    "ProbeResult",
    "ProbeSetupError",
    "ProbeTimeouts",
    "ProbeablePolicy",
    "TableValue",
    "classify",
    "clean",
    "parse_value",
    "probe_argv",
    "probe_destination",
    "probe_policy",
    "probe_target",
    "read_client_defaults",
    "rfc3339",
    "value_of",
]
