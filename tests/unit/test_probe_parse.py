"""The probe's argv and its reading of posttls-finger output (pure; no Postfix needed).

The outputs below are verbatim ``posttls-finger`` (Postfix 3.7.11) runs against
the loopback sinks of the postfix test suite; tests/postfix/test_probe.py
checks the same verdicts against live sinks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from mailtls_operator import probe
from mailtls_operator.podrunner import ExecResult, PodRef, PodRunnerError
from mailtls_operator.policy import load_policy
from mailtls_operator.postfix import InvalidArgument

P = "posttls-finger: "
PEER = "127.0.0.1[127.0.0.1]:42526"
SUMMARY = ("TLS connection established to {peer}: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 "
           "(256/256 bits) key-exchange X25519 server-signature ECDSA (prime256v1) "
           "server-digest SHA256")
CN = (f"{PEER}: subject_CN=sink.mailtls.test, issuer_CN=mailtls test CA, fingerprint=88:20:2D,"
      " pkey_fingerprint=DE:19:C1")


def out(*lines: str) -> str:
    return "".join(P + ln + "\n" for ln in lines)


def chat_ehlo(starttls: bool, port: int = 42526) -> list[str]:
    return [f"Connected to 127.0.0.1[127.0.0.1]:{port}",
            "< 220 sink.mailtls.test Python SMTP 1.4.6", "> EHLO pod.mailtls.test",
            "< 250-sink.mailtls.test", "< 250-SIZE 33554432", "< 250-8BITMIME",
            "< 250-SMTPUTF8", *(["< 250-STARTTLS"] if starttls else []), "< 250 HELP"]


AFTER_TLS = ["> EHLO pod.mailtls.test", "< 250-sink.mailtls.test", "< 250-AUTH LOGIN PLAIN",
             "< 250 HELP", "> QUIT", "< 221 Bye"]

PLAIN_SINK = out(*chat_ehlo(False, 42525), "> QUIT", "< 221 Bye")
NONE_ON_TLS_SINK = out(*chat_ehlo(True), "> QUIT", "< 221 Bye")
SELF_SIGNED_SECURE = out(
    *chat_ehlo(True), "> STARTTLS", "< 220 Ready to start TLS",
    f"certificate verification failed for {PEER}: self-signed certificate",
    CN, "Untrusted " + SUMMARY.format(peer=PEER), *AFTER_TLS)
WRONG_NAME = out(
    *chat_ehlo(True), "> STARTTLS", "< 220 Ready to start TLS",
    f"server certificate verification failed for {PEER}: num=62:hostname mismatch",
    CN, "Untrusted " + SUMMARY.format(peer=PEER), *AFTER_TLS)
VERIFIED = out(
    *chat_ehlo(True), "> STARTTLS", "< 220 Ready to start TLS",
    f"{PEER}: matched peername: sink.mailtls.test", f"{PEER}: Matched trust anchor at depth 1",
    CN, "Verified " + SUMMARY.format(peer=PEER), *AFTER_TLS)
ENCRYPTED = out(*chat_ehlo(True), "> STARTTLS", "< 220 Ready to start TLS", CN,
                "Untrusted " + SUMMARY.format(peer=PEER), *AFTER_TLS)
FINGERPRINT_MISMATCH = out(
    *chat_ehlo(True), "> STARTTLS", "< 220 Ready to start TLS",
    f"server certificate verification failed for {PEER}: num=65:no matching DANE TLSA records",
    CN, "Untrusted " + SUMMARY.format(peer=PEER), *AFTER_TLS)
HANDSHAKE = out(*chat_ehlo(True), "> STARTTLS", "< 220 Ready to start TLS",
                f"SSL_connect error to {PEER}: lost connection")
REFUSED = out("Failed to establish session to [127.0.0.1]:1 via 127.0.0.1: connect to "
              "127.0.0.1[127.0.0.1]:1: Connection refused")
GREETING_TIMEOUT = out("Connected to 127.0.0.1[127.0.0.1]:48775",
                       "timeout while reading server greeting")
GREETING_TIMEOUT_NOCHAT = out("timeout while reading server greeting")
REJECTED = out("SMTP service not available: 554 5.3.2 go away")
LOOKUP = out("warning: DNSSEC validation may be unavailable",
             "warning: reason: dnssec_probe 'ns:.' received a response that is not DNSSEC "
             "validated",
             "Destination address lookup failed: Host or domain name not found. Name service "
             "error for name=nonexistent.invalid type=A: Host not found")
MISSING_TA = out("warning: error opening trust anchor file: /missing.pem: No such file or "
                 "directory", "fatal: Failed to load trust anchor file: /missing.pem")


@pytest.mark.parametrize(("output", "status", "level", "result", "reason", "message"), [
    (PLAIN_SINK, 0, "encrypt", "Fail", "NoStartTLS",
     "EHLO reply from 127.0.0.1[127.0.0.1]:42525 does not offer STARTTLS"),
    (PLAIN_SINK, 0, "secure", "Fail", "NoStartTLS", None),
    (PLAIN_SINK, 0, "may", "Pass", "PlainAllowed", None),
    (PLAIN_SINK, 0, "none", "Pass", "PlainAllowed", None),
    (NONE_ON_TLS_SINK, 0, "none", "Pass", "PlainAllowed",
     f"{PEER} offers STARTTLS; level none sends in clear text"),
    (SELF_SIGNED_SECURE, 0, "secure", "Fail", "Untrusted",
     f"certificate verification failed for {PEER}: self-signed certificate"),
    (SELF_SIGNED_SECURE, 0, "verify", "Fail", "Untrusted", None),
    (SELF_SIGNED_SECURE, 0, "encrypt", "Pass", "Encrypted", None),
    (SELF_SIGNED_SECURE, 0, "may", "Pass", "Encrypted", None),
    (WRONG_NAME, 0, "secure", "Fail", "NameMismatch",
     f"server certificate verification failed for {PEER}: num=62:hostname mismatch"),
    (VERIFIED, 0, "secure", "Pass", "Verified", "Verified " + SUMMARY.format(peer=PEER)),
    (VERIFIED, 0, "verify", "Pass", "Verified", None),
    (ENCRYPTED, 0, "encrypt", "Pass", "Encrypted", "Untrusted " + SUMMARY.format(peer=PEER)),
    (FINGERPRINT_MISMATCH, 0, "fingerprint", "Fail", "FingerprintMismatch", None),
    (FINGERPRINT_MISMATCH, 0, "secure", "Fail", "Untrusted", None),
    (HANDSHAKE, 0, "encrypt", "Fail", "HandshakeFailed",
     f"SSL_connect error to {PEER}: lost connection"),
    (HANDSHAKE, 0, "may", "Pass", "PlainAllowed", None),
    (REFUSED, 0, "encrypt", "Fail", "Unreachable", None),
    (REFUSED, 0, "may", "Fail", "Unreachable", None),
    (GREETING_TIMEOUT, 0, "encrypt", "Fail", "Timeout", "timeout while reading server greeting"),
    (GREETING_TIMEOUT_NOCHAT, 0, "may", "Fail", "Timeout", None),
    (REJECTED, 0, "encrypt", "Fail", "Unreachable",
     "SMTP service not available: 554 5.3.2 go away"),
    (LOOKUP, 0, "encrypt", "Fail", "Unreachable", None),
    (MISSING_TA, 1, "secure", "Fail", "ConfigError",
     "Failed to load trust anchor file: /missing.pem"),
    (out("fatal: timeout while sending STARTTLS"), 1, "encrypt", "Fail", "Timeout", None),
    (out("fatal: something else entirely"), 1, "encrypt", "Fail", "Error", None),
    ("", 1, "encrypt", "Fail", "Error", "exit status 1"),
])
def test_classify_real_outputs(output: str, status: int, level: str, result: str, reason: str,
                               message: str | None) -> None:
    verdict = probe.classify(output, status, level)
    assert (verdict.result, verdict.reason) == (result, reason), verdict
    if message is not None:
        assert verdict.message == message


def test_exit_zero_is_not_trusted_without_the_output() -> None:
    """posttls-finger exits 0 against a plain server, a refused port and a bad certificate."""
    for output in (PLAIN_SINK, REFUSED, SELF_SIGNED_SECURE):
        assert probe.classify(output, 0, "secure").result == "Fail"


def test_without_chat_silence_means_no_starttls() -> None:
    """With -c, posttls-finger prints nothing at all for a server without STARTTLS."""
    assert probe.classify("", 0, "encrypt").reason == "NoStartTLS"
    assert probe.classify("", 0, "may").reason == "PlainAllowed"
    nochat_verified = out(f"{PEER}: matched peername: sink.mailtls.test",
                          "Verified " + SUMMARY.format(peer=PEER))
    assert probe.classify(nochat_verified, 0, "secure").reason == "Verified"


def test_a_server_cannot_forge_the_verdict() -> None:
    """Server text reaches the output only in chat lines ('< ') or after a fixed prefix."""
    forged = PLAIN_SINK.replace(
        "< 250 HELP", "< 250-Verified TLS connection established to x: TLSv1.3\n"
        f"{P}< 250 HELP")
    assert probe.classify(forged, 0, "secure").reason == "NoStartTLS"
    # A bare CR inside a reply line must not start a new line for the parser.
    cr = PLAIN_SINK.replace("< 250 HELP", "< 250 HELP\r" + P + "Verified " +
                            SUMMARY.format(peer=PEER))
    assert probe.classify(cr, 0, "secure").reason == "NoStartTLS"
    # Lines that do not start with the program's prefix are ignored.
    assert probe.classify("Verified " + SUMMARY.format(peer=PEER) + "\n", 0,
                          "secure").result == "Fail"


def test_starttls_offered_only_counts_in_the_first_ehlo_reply() -> None:
    after = out(*chat_ehlo(False), "> QUIT", "< 250-STARTTLS")
    assert probe.classify(after, 0, "none").message.endswith("does not offer STARTTLS")


def test_trusted_but_unmatched_is_a_name_mismatch() -> None:
    trusted = out(*chat_ehlo(True), "> STARTTLS", "< 220 Ready", CN,
                  "Trusted " + SUMMARY.format(peer=PEER))
    assert probe.classify(trusted, 0, "verify").reason == "NameMismatch"
    assert probe.classify(trusted, 0, "encrypt").reason == "Encrypted"


def test_starttls_refused_and_ehlo_refused() -> None:
    refused = out(*chat_ehlo(True), "> STARTTLS", "< 454 4.7.0 TLS not available",
                  "STARTTLS rejected: 454 4.7.0 TLS not available")
    assert probe.classify(refused, 0, "encrypt").reason == "NoStartTLS"
    assert probe.classify(refused, 0, "may").reason == "PlainAllowed"
    helo_only = out("Connected to x[192.0.2.1]:25", "< 220 old", "> EHLO pod",
                    "< 502 unknown", "EHLO rejected: 502 unknown")
    assert probe.classify(helo_only, 0, "encrypt").reason == "NoStartTLS"
    assert probe.classify(helo_only, 0, "may").reason == "PlainAllowed"


def test_dane_levels() -> None:
    no_tlsa = out('no TLSA records found, resorting to "secure"',
                  *chat_ehlo(True), "> STARTTLS", "< 220 Ready",
                  f"certificate verification failed for {PEER}: untrusted issuer /CN=x",
                  "Untrusted " + SUMMARY.format(peer=PEER))
    assert probe.classify(no_tlsa, 0, "dane-only").reason == "NoTLSARecords"
    # smtp(8): dane without TLSA records is opportunistic TLS
    assert probe.classify(no_tlsa, 0, "dane").reason == "Encrypted"
    plain_no_tlsa = out('no TLSA records found, resorting to "secure"', *chat_ehlo(False))
    assert probe.classify(plain_no_tlsa, 0, "dane").reason == "PlainAllowed"
    verified = out(*chat_ehlo(True), "> STARTTLS", "< 220 Ready",
                   f"{PEER}: Matched DANE EE certificate at depth 0",
                   "Verified " + SUMMARY.format(peer=PEER))
    assert probe.classify(verified, 0, "dane").reason == "Verified"
    assert probe.classify(verified, 0, "dane-only").reason == "Verified"
    tlsa_mismatch = SELF_SIGNED_SECURE
    assert probe.classify(tlsa_mismatch, 0, "dane").reason == "Untrusted"
    assert probe.classify(LOOKUP, 0, "dane-only").reason == "DNSSECUnavailable"
    tlsa_error = out("Failed to establish session to example.org via mx.example.org: TLSA "
                     "lookup error for mx.example.org:25")
    assert probe.classify(tlsa_error, 0, "dane-only").reason == "DNSSECUnavailable"


def test_unknown_level_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown TLS security level"):
        probe.classify("", 0, "strict")


def test_messages_are_one_printable_line_and_bounded() -> None:
    noisy = out("SMTP service not available: 554 " + "x\x1b[31m" * 400)
    verdict = probe.classify(noisy, 0, "encrypt")
    assert "\x1b" not in verdict.message
    assert len(verdict.message) <= 1024


# -- argv ------------------------------------------------------------------------


def pol(level: str, dests: list[str], **spec: object):  # type: ignore[no-untyped-def]
    return load_policy({"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy",
                        "metadata": {"name": "p", "namespace": "mail"},
                        "spec": {"destinations": dests, "level": level, **spec}})


def test_argv_for_secure_with_everything() -> None:
    p = pol("secure", ["[mx.example.com]:25"], match=["mx.example.com", ".example.com"],
            tafile=["/etc/postfix/tls/ca.pem", "/etc/postfix/tls/ca2.pem"], ciphers="high",
            protocols=">=TLSv1.2", servername="hostname", exclude=["3DES"])
    argv = probe.probe_argv(p, "[mx.example.com]:25", connect_timeout=5, command_timeout=7.5)
    assert argv == ["posttls-finger", "-t", "5", "-T", "8", "-l", "secure",
                    "-A", "/etc/postfix/tls/ca.pem", "-A", "/etc/postfix/tls/ca2.pem",
                    "-p", ">=TLSv1.2", "-g", "high", "-s", "hostname",
                    "--", "[mx.example.com]:25", "mx.example.com", ".example.com"]


def test_argv_defaults_fill_in_what_posttls_finger_does_not_read() -> None:
    d = probe.ClientDefaults(ca_file="/etc/ssl/certs/ca-certificates.crt", ca_path="/etc/ssl/c",
                             trust_anchor_files=("/ta.pem",), protocols=">=TLSv1",
                             mandatory_protocols="!SSLv2, !SSLv3", ciphers="medium",
                             mandatory_ciphers="high", servername="nexthop")
    secure = probe.probe_argv("secure", "example.com", connect_timeout=1, command_timeout=1,
                              defaults=d)
    assert secure == ["posttls-finger", "-t", "1", "-T", "1", "-l", "secure", "-A", "/ta.pem",
                      "-F", "/etc/ssl/certs/ca-certificates.crt", "-P", "/etc/ssl/c",
                      "-p", "!SSLv2, !SSLv3", "-g", "high", "-s", "nexthop",
                      "--", "example.com"]
    may = probe.probe_argv("may", "example.com", connect_timeout=1, command_timeout=1,
                           defaults=d)
    assert may[may.index("-p") + 1] == ">=TLSv1" and may[may.index("-g") + 1] == "medium"
    assert "-A" not in may
    none = probe.probe_argv("none", "example.com", connect_timeout=1, command_timeout=1,
                            defaults=d)
    assert none == ["posttls-finger", "-t", "1", "-T", "1", "-l", "none", "--", "example.com"]


def test_argv_fingerprint_dane_and_chat() -> None:
    fp = "AA:" * 31 + "AA"
    other = "BB:" * 31 + "BB"
    argv = probe.probe_argv(f"fingerprint match={fp}|{other}", "[192.0.2.1]:25",
                            connect_timeout=1, command_timeout=1)
    assert argv[-3:] == ["[192.0.2.1]:25", fp, other]
    dane = probe.probe_argv("dane", "example.org", connect_timeout=1, command_timeout=1,
                            chat=False)
    assert dane[dane.index("-l") + 1] == "dane-only" and "-c" in dane
    no_proto = probe.probe_argv("encrypt protocols=<=TLSv1.1", "example.org",
                                connect_timeout=1, command_timeout=1, restrict_protocols=False)
    assert "-p" not in no_proto


def test_argv_refuses_what_must_not_become_an_argument() -> None:
    for key in (".example.com", "-oops", "a b"):
        with pytest.raises(InvalidArgument):
            probe.probe_argv("encrypt", key, connect_timeout=1, command_timeout=1)
    with pytest.raises(InvalidArgument):
        probe.probe_argv("secure match=-x", "example.com", connect_timeout=1, command_timeout=1)
    with pytest.raises(InvalidArgument):
        probe.probe_argv("secure tafile=/a\x00b", "example.com", connect_timeout=1,
                         command_timeout=1)
    with pytest.raises(InvalidArgument):
        probe.probe_argv("encrypt bogus=1", "example.com", connect_timeout=1, command_timeout=1)


def test_parse_value() -> None:
    v = probe.parse_value("secure match=nexthop:dot-nexthop ciphers=high tafile=/a tafile=/b "
                          "connection_reuse=yes")
    assert v.level == "secure" and v.match == ("nexthop", "dot-nexthop")
    assert v.tafile == ("/a", "/b") and v.ciphers == "high" and v.connection_reuse == "yes"
    assert probe.parse_value("ENCRYPT").level == "encrypt"
    for bad in ("", "bogus", "encrypt match", "encrypt ciphers=high ciphers=low"):
        with pytest.raises(InvalidArgument):
            probe.parse_value(bad)


def test_probe_targets() -> None:
    assert probe.probe_target("[127.0.0.1]:2525") == "[127.0.0.1]:2525"
    assert probe.probe_target("example.com:587") == "example.com:587"
    assert probe.probe_target(".example.com") is None
    assert probe.probe_target("bücher.example") == "xn--bcher-kva.example"
    assert probe.probe_target("bücher.example:587") == "xn--bcher-kva.example:587"


# -- running, with an injected runner -----------------------------------------------


@dataclass
class FakeRunner:
    """Answers posttls-finger / postconf from a table; records argv and concurrency."""

    answers: dict[str, ExecResult] = field(default_factory=dict)
    default: ExecResult = field(default_factory=lambda: ExecResult(0, PLAIN_SINK.encode()))
    raise_: Exception | None = None
    delay: float = 0.0
    calls: list[tuple[str, ...]] = field(default_factory=list)
    in_flight: int = 0
    peak: int = 0

    async def run(self, pod: PodRef, argv: Sequence[str], *, stdin: bytes | None = None,
                  timeout: float = 60.0) -> ExecResult:
        self.calls.append(tuple(argv))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.raise_ is not None:
                raise self.raise_
            if argv[0] == "postconf":
                return ExecResult(0, b"smtp_dns_support_level = disabled\n"
                                     b"smtp_tls_CAfile = /etc/ssl/ca.pem\n")
            dest = argv[argv.index("--") + 1]
            return self.answers.get(dest, self.default)
        finally:
            self.in_flight -= 1


POD = PodRef("mail", "relay-0")


async def test_transport_failures_become_results() -> None:
    timeout = FakeRunner(raise_=PodRunnerError("exec 'posttls-finger' in mail/relay-0: timed "
                                               "out after 85s"))
    got = await probe.probe_destination(timeout, POD, "encrypt", "example.com")
    assert (got.result, got.reason) == ("Fail", "Timeout")
    gone = FakeRunner(raise_=PodRunnerError('pods "relay-0" not found'))
    got = await probe.probe_destination(gone, POD, "encrypt", "example.com")
    assert (got.result, got.reason) == ("Fail", "Error")
    missing = FakeRunner(default=ExecResult(126, b"", b"exec: posttls-finger: No such file\n"))
    got = await probe.probe_destination(missing, POD, "encrypt", "example.com")
    assert got.reason == "Error" and "not available" in got.message
    assert got.pod == "mail/relay-0" and got.to_status()["time"].endswith("Z")


async def test_dane_without_dnssec_reports_what_postfix_would_do() -> None:
    runner = FakeRunner()
    d = probe.ClientDefaults(dns_support_level="disabled")
    only = await probe.probe_destination(runner, POD, "dane-only", "example.com", defaults=d)
    assert (only.result, only.reason) == ("Fail", "DNSSECUnavailable")
    assert runner.calls == []  # nothing to probe: Postfix defers everything
    dane = await probe.probe_destination(runner, POD, "dane", "example.com", defaults=d)
    assert (dane.result, dane.reason) == ("Fail", "DNSSECUnavailable")
    assert "uses may instead (PlainAllowed" in dane.message
    assert runner.calls[0][runner.calls[0].index("-l") + 1] == "may"


async def test_protocol_mismatch_is_proven_by_a_second_probe() -> None:
    class Proto(FakeRunner):
        async def run(self, pod: PodRef, argv: Sequence[str], *, stdin: bytes | None = None,
                      timeout: float = 60.0) -> ExecResult:
            self.calls.append(tuple(argv))
            return ExecResult(0, (HANDSHAKE if "-p" in argv else ENCRYPTED).encode())

    runner = Proto()
    got = await probe.probe_destination(runner, POD, "encrypt protocols=<=TLSv1.1",
                                        "[127.0.0.1]:42526")
    assert got.reason == "ProtocolMismatch"
    assert "without protocols=<=TLSv1.1 the handshake succeeds: TLSv1.3" in got.message
    assert len(runner.calls) == 2


async def test_probe_policy_order_dedup_skip_and_concurrency() -> None:
    p = pol("encrypt", ["b.example", "bücher.example", ".sub.example", "a.example",
                        "c.example", "d.example", "e.example"])
    runner = FakeRunner(delay=0.02, answers={"a.example": ExecResult(0, ENCRYPTED.encode())})
    outs = await probe.probe_policy(runner, POD, p, concurrency=2)
    assert [o.destination for o in outs] == list(p.keys)
    by_key = {o.destination: o for o in outs}
    assert by_key["a.example"].reason == "Encrypted"
    assert by_key["b.example"].reason == "NoStartTLS"
    assert by_key[".sub.example"].result == "Skipped"
    assert by_key["xn--bcher-kva.example"].reason == by_key["bücher.example"].reason
    finger = [c for c in runner.calls if c[0] == "posttls-finger"]
    assert len(finger) == 6  # 8 keys: the IDN twins share a probe, .sub.example has none
    assert runner.peak <= 2
    first = next(c for c in finger)
    assert "-F" in first and first[first.index("-F") + 1] == "/etc/ssl/ca.pem"
