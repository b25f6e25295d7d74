"""The preflight probe against real sinks, checked against what real Postfix then does.

One pod routes a test domain to each sink; the policies go through the real
model, renderer and rollout; each key is probed with ``posttls-finger`` in the
pod (through the local runner, so with the pod's main.cf), and then a real
message is sent to each domain.  A probe that says Pass must mean the mail is
sent, Fail that it is deferred, with one documented exception: ``dane``
without DNSSEC lookups, which Postfix silently downgrades to ``may``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mailtls_operator import probe
from mailtls_operator.rollout import apply_to_pod
from testbed import (
    LocalCA,
    LocalPodRunner,
    SmtpSink,
    free_port,
    plain_sink,
    starttls_sink,
)

from .conftest import BOTH_VERSIONS, PodFactory
from .helpers import policy, tables, target

pytestmark = pytest.mark.postfix

MAILTLS = str(Path(sys.executable).with_name("mailtls"))
TIMEOUTS = probe.ProbeTimeouts(connect=5, command=5)
WRONG = "wrong.mailtls.test"


@dataclass(frozen=True)
class Case:
    name: str
    sink: str  # plain | self | ca | closed
    level: str
    spec: Callable[[SmtpSink | None, LocalCA, Path], dict[str, Any]]
    result: str
    reason: str
    delivery: str  # what Postfix then does: sent | deferred


def _digest(cert: Path) -> str:
    return x509.load_pem_x509_certificate(cert.read_bytes()).fingerprint(
        hashes.SHA256()).hex(":").upper()


def _none(_s: SmtpSink | None, _ca: LocalCA, _d: Path) -> dict[str, Any]:
    return {}


CASES = [
    Case("encrypt-plain", "plain", "encrypt", _none, "Fail", "NoStartTLS", "deferred"),
    Case("may-plain", "plain", "may", _none, "Pass", "PlainAllowed", "sent"),
    Case("none-starttls", "self", "none", _none, "Pass", "PlainAllowed", "sent"),
    Case("encrypt-self-signed", "self", "encrypt", _none, "Pass", "Encrypted", "sent"),
    Case("secure-self-signed", "self", "secure",
         lambda s, ca, d: {"match": [s.hostname if s else ""]}, "Fail", "Untrusted", "deferred"),
    Case("secure-self-signed-ca-tafile", "self", "secure",
         lambda s, ca, d: {"match": [s.hostname if s else ""], "tafile": [str(ca.pem_path)]},
         "Fail", "Untrusted", "deferred"),
    Case("secure-wrong-name", "ca", "secure",
         lambda s, ca, d: {"match": [WRONG], "tafile": [str(ca.pem_path)]},
         "Fail", "NameMismatch", "deferred"),
    Case("secure-verified", "ca", "secure",
         lambda s, ca, d: {"match": [s.hostname if s else ""], "tafile": [str(ca.pem_path)]},
         "Pass", "Verified", "sent"),
    Case("fingerprint-match", "self", "fingerprint",
         lambda s, ca, d: {"match": [_digest(d / f"{s.name if s else ''}.crt")]},
         "Pass", "Verified", "sent"),
    Case("fingerprint-wrong", "self", "fingerprint",
         lambda s, ca, d: {"match": [":".join(["AB"] * 32)]},
         "Fail", "FingerprintMismatch", "deferred"),
    Case("protocols-too-old", "ca", "encrypt",
         lambda s, ca, d: {"protocols": "<=TLSv1.1"}, "Fail", "ProtocolMismatch", "deferred"),
    Case("closed-port", "closed", "encrypt", _none, "Fail", "Unreachable", "deferred"),
    Case("dane-only-no-dnssec", "self", "dane-only", _none, "Fail", "DNSSECUnavailable",
         "deferred"),
    # Postfix downgrades dane to may without DNSSEC lookups: the mail goes out,
    # and the probe fails on purpose, because the policy is not what it says.
    Case("dane-no-dnssec", "plain", "dane", _none, "Fail", "DNSSECUnavailable", "sent"),
]


@BOTH_VERSIONS
async def test_probe_verdicts_agree_with_postfix_delivery(
        runner: LocalPodRunner, make_pod: PodFactory, sinks: Callable[[SmtpSink], SmtpSink],
        ca: LocalCA, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    hops: dict[str, str] = {}
    case_sinks: dict[str, SmtpSink | None] = {}
    for i, case in enumerate(CASES):
        sink: SmtpSink | None
        if case.sink == "plain":
            sink = sinks(plain_sink(f"plain{i}"))
        elif case.sink == "self":
            sink = sinks(starttls_sink(certs, name=f"self{i}"))
        elif case.sink == "ca":
            sink = sinks(starttls_sink(certs, name=f"ca{i}", ca=ca))
        else:
            sink = None
        case_sinks[case.name] = sink
        hops[case.name] = sink.nexthop if sink else f"[127.0.0.1]:{free_port()}"
    routes = {f"{c.name}.test": f"smtp:{hops[c.name]}" for c in CASES}
    pod, inst = make_pod("relay-0", routes=routes)
    pols = [policy(c.name, c.level, [hops[c.name]], **c.spec(case_sinks[c.name], ca, certs))
            for c in CASES]
    assert (await apply_to_pod(runner, target(pod, inst), tables(*pols), timeout=10)).ok

    defaults = await probe.read_client_defaults(runner, pod)
    assert defaults.dns_support_level == "disabled"
    outcomes = await asyncio.gather(*(
        probe.probe_destination(runner, pod, p, hops[c.name], timeouts=TIMEOUTS,
                                defaults=defaults) for c, p in zip(CASES, pols, strict=True)))

    qids = {c.name: inst.submit(f"user@{c.name}.test") for c in CASES}
    problems = []
    for case, out in zip(CASES, outcomes, strict=True):
        attempt = inst.wait_for_delivery(qids[case.name], timeout=15)
        got = (out.result, out.reason, attempt.status)
        if got != (case.result, case.reason, case.delivery):
            problems.append(f"{case.name}: probe {out.result} {out.reason} ({out.message}); "
                            f"Postfix {attempt.status} ({attempt.reason})")
        assert out.destination == hops[case.name] and out.pod == str(pod)
    assert not problems, "\n".join(problems)


@BOTH_VERSIONS
async def test_probe_policy_through_the_pod(
        runner: LocalPodRunner, make_pod: PodFactory, plain: SmtpSink,
        self_signed: SmtpSink) -> None:
    pod, _ = make_pod("relay-0")
    p = policy("mixed", "encrypt", [plain.nexthop, self_signed.nexthop, ".mailtls.test"])
    outs = await probe.probe_policy(runner, pod, p, concurrency=2, timeouts=TIMEOUTS)
    assert [(o.destination, o.result, o.reason) for o in outs] == [
        (plain.nexthop, "Fail", "NoStartTLS"),
        (self_signed.nexthop, "Pass", "Encrypted"),
        (".mailtls.test", "Skipped", "NotProbeable"),
    ]
    assert outs[0].message == (f"EHLO reply from 127.0.0.1[127.0.0.1]:{plain.port} does not "
                               "offer STARTTLS")
    assert outs[1].message.startswith(
        f"Untrusted TLS connection established to 127.0.0.1[127.0.0.1]:{self_signed.port}: TLSv1")
    argvs = [c.argv for c in runner.calls_for(pod)]
    assert argvs[0][:2] == ("postconf", "-x")
    assert sum(a[0] == "posttls-finger" for a in argvs) == 2


def _write(path: Path, *docs: str) -> Path:
    path.write_text("---\n".join(docs))
    return path


def _doc(name: str, level: str, dests: list[str], extra: str = "") -> str:
    return (f"apiVersion: mailtls.io/v1alpha1\nkind: MailTLSPolicy\n"
            f"metadata: {{name: {name}, namespace: mail}}\n"
            f"spec:\n  level: {level}\n  destinations: {dests!r}\n{extra}")


def _probe_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MAILTLS, "probe", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_cli_exit_codes_on_real_sinks(
        make_pod: PodFactory, plain: SmtpSink, self_signed: SmtpSink, ca_signed: SmtpSink,
        ca: LocalCA, tmp_path: Path) -> None:
    _, inst = make_pod("relay-0")
    cfg = str(inst.etc_dir)
    good = _write(tmp_path / "good.yaml",
                  _doc("tls", "encrypt", [self_signed.nexthop]),
                  _doc("verified", "secure", [ca_signed.nexthop],
                       f"  match: [{ca_signed.hostname}]\n  tafile: [{ca.pem_path}]\n"),
                  _doc("clear", "may", [plain.nexthop, ".sub.mailtls.test"]))
    res = _probe_cli("-f", str(good), "--config-dir", cfg, "--timeout", "5")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines == [
        f"mail/tls {self_signed.nexthop} Pass Encrypted: Untrusted TLS connection established "
        f"to 127.0.0.1[127.0.0.1]:{self_signed.port}: " + lines[0].split(": ", 2)[2],
        f"mail/verified {ca_signed.nexthop} Pass Verified: Verified TLS connection established "
        f"to 127.0.0.1[127.0.0.1]:{ca_signed.port}: " + lines[1].split(": ", 2)[2],
        f"mail/clear {plain.nexthop} Pass PlainAllowed: EHLO reply from "
        f"127.0.0.1[127.0.0.1]:{plain.port} does not offer STARTTLS",
        "mail/clear .sub.mailtls.test Skipped NotProbeable: .sub.mailtls.test matches every "
        "subdomain, not one server: probe a concrete destination instead",
    ]
    assert "4 destination(s) of 3 policy(ies): 3 probed, 0 would fail" in res.stderr

    bad = _write(tmp_path / "bad.yaml", _doc("strict", "encrypt", [plain.nexthop]),
                 _doc("named", "secure", [ca_signed.nexthop],
                      f"  match: [{WRONG}]\n  tafile: [{ca.pem_path}]\n"))
    res = _probe_cli("-f", str(good), "-f", str(bad), "--config-dir", cfg, "--timeout", "5")
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"mail/strict {plain.nexthop} Fail NoStartTLS: EHLO reply from" in res.stdout
    assert (f"mail/named {ca_signed.nexthop} Fail NameMismatch: server certificate verification "
            f"failed for 127.0.0.1[127.0.0.1]:{ca_signed.port}: num=62:hostname mismatch"
            in res.stdout)

    invalid = _write(tmp_path / "invalid.yaml", _doc("typo", "encrpyt", [plain.nexthop]))
    res = _probe_cli("-f", str(invalid), "-f", str(good), "--config-dir", cfg)
    assert res.returncode == 2 and res.stdout == ""
    assert "mail/typo" in res.stderr and "spec.level" in res.stderr

    res = _probe_cli("-f", str(good), "--config-dir", str(tmp_path / "nowhere"))
    assert res.returncode == 2 and res.stdout == ""
