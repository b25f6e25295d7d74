"""routing.lint and the Verified condition: pure functions of lines, facts and probes."""

from __future__ import annotations

from dataclasses import dataclass

from mailtls_operator.routing import InstanceConfig, lint
from mailtls_operator.status import (
    DNSSEC_DISABLED,
    POLICY_BYPASSED,
    PROBE_FAILED,
    PROBES_PASSED,
    VERIFIED,
    probe_status,
    verified_condition,
)

RELAY = InstanceConfig(relayhost="[smarthost.example]:587", transport_maps="lmdb:/t",
                       smtp_dns_support_level="dnssec")


def test_lint_names_bypassed_keys_of_each_policy_only() -> None:
    found = lint({"mail/a": ["a.example encrypt", "b.example encrypt"],
                  "mail/routed": ["r.example secure match=nexthop"],
                  "mail/relay": ["[smarthost.example]:587 encrypt"]},
                 ["r.example"], RELAY)
    assert set(found) == {"mail/a"}
    [(reason, message)] = found["mail/a"]
    assert reason == POLICY_BYPASSED
    assert "a.example, b.example" in message and "[smarthost.example]:587" in message


def test_lint_warns_dane_without_dnssec_and_nothing_without_a_relayhost() -> None:
    direct = InstanceConfig(smtp_dns_support_level="disabled")
    found = lint({"mail/d": ["d.example dane"], "mail/e": ["e.example encrypt"]}, [], direct)
    assert found == {"mail/d": [(DNSSEC_DISABLED, found["mail/d"][0][1])]}
    assert "'disabled'" in found["mail/d"][0][1]
    assert lint({"mail/d": ["d.example dane-only"]}, [], RELAY)["mail/d"][0][0] \
        == POLICY_BYPASSED  # dnssec on: only the relayhost trap remains


@dataclass(frozen=True)
class Outcome:
    destination: str
    reason: str
    message: str
    failed: bool

    def to_status(self) -> dict[str, str]:
        return {"destination": self.destination, "reason": self.reason}


def test_verified_comes_from_every_instances_probes() -> None:
    good = Outcome("a.example", "Verified", "ok", False)
    bad = Outcome("b.example", "NoStartTLS", "no STARTTLS", True)
    assert verified_condition([]) is None
    passed = verified_condition([("relay", [good]), ("edge", [good])])
    assert passed is not None and (passed.type, passed.status, passed.reason) == (
        VERIFIED, "True", PROBES_PASSED)
    failed = verified_condition([("relay", [good]), ("edge", [bad])])
    assert failed is not None and (failed.status, failed.reason) == ("False", PROBE_FAILED)
    assert "1 of 2 probe(s) fail: b.example from edge: NoStartTLS" in failed.message
    assert probe_status([("edge", [bad])]) == [
        {"destination": "b.example", "reason": "NoStartTLS", "instance": "edge"}]
