"""Testing-mode MTA-STS policies, probed: would the line pass if it were enforced?

I/O: the MX hosts come from discovery's own DNS (``--nameserver``), only those
the policy's ``mx`` patterns allow (RFC 8461 §4.1), and each is probed at its
address with ``posttls-finger`` and the very line enforcing would write
(:func:`mailtls_operator.probe.probe_destination`, the probe the operator runs
in a pod).  The verdict is conservative: "would pass" only if every allowed MX
host passes (Postfix may try any of them).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import probe
from ..podrunner import PodRef, PodRunner
from .decide import MTA_STS, DomainState
from .dns import DnsFailure
from .engine import Discoverer
from .mtasts import mx_matches

SMTP_PORT = 25
MAX_HOSTS = 3


@dataclass(frozen=True)
class Verdict:
    """One testing-mode domain: would enforcing pass, and why."""

    domain: str
    value: str
    passed: bool
    details: tuple[str, ...]

    def line(self) -> str:
        what = "would pass" if self.passed else "would fail"
        return f"{self.domain}: mta-sts testing: {what} if enforced ({'; '.join(self.details)})"


async def probe_testing(discoverer: Discoverer, state: DomainState, runner: PodRunner,
                        pod: PodRef, defaults: probe.ClientDefaults, *,
                        port: int = SMTP_PORT,
                        timeouts: probe.ProbeTimeouts | None = None) -> Verdict | None:
    """The verdict for a domain whose MTA-STS policy is in testing mode (else None)."""
    found = state.candidates.get(MTA_STS)
    sts = state.sts
    if found is None or found[1] != "testing" or sts is None or sts.cached is None:
        return None
    value, patterns = found[0], sts.cached.policy.mx
    try:
        hosts, _ = await discoverer.dns.mx(state.domain)
    except DnsFailure as exc:
        return Verdict(state.domain, value, False, (f"MX lookup failed: {exc}",))
    allowed = [h for h in hosts if any(mx_matches(p, h) for p in patterns)]
    if not allowed:
        return Verdict(state.domain, value, False, (
            f"no MX host ({', '.join(hosts)}) matches the policy's mx patterns",))
    details: list[str] = []
    passed = True
    for host in allowed[:MAX_HOSTS]:
        try:
            address = (await discoverer.dns.addresses(host))[0]
        except DnsFailure as exc:
            details.append(f"{host}: {exc}")
            passed = False
            continue
        bracket = f"[{address}]" if ":" not in address else f"[ipv6:{address}]"
        out = await probe.probe_destination(runner, pod, value, f"{bracket}:{port}",
                                            timeouts=timeouts, defaults=defaults)
        details.append(f"{host} {bracket}:{port}: {out.result} {out.reason}: {out.message}")
        passed = passed and out.result == probe.PASS
    return Verdict(state.domain, value, passed, tuple(details))
