"""Agent reports: what an agent writes is what the operator reads (pure, both sides)."""

from __future__ import annotations

from datetime import UTC, datetime

from mailtls_operator.agent.collect import agent_trust_anchors, agent_view
from mailtls_operator.agent.report import (
    ANN_APPLIED,
    ANN_REPORT,
    MAX_REPORT,
    AgentReport,
    parse_report,
    report_of,
)
from mailtls_operator.facts import InstanceFacts
from mailtls_operator.mailqueue import DeferredSummary
from mailtls_operator.observer import PolicyProbes
from mailtls_operator.probe import ProbeOutcome
from mailtls_operator.world import PodRecord

AT = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
REV = "a" * 64


def full_report(**kw: object) -> AgentReport:
    outcome = ProbeOutcome("[127.0.0.1]:2525", "Fail", "NoStartTLS", "no STARTTLS", AT)
    report = AgentReport(
        wanted=REV, applied=REV, source="api",
        facts=InstanceFacts({"relayhost": "[relay]:25", "transport_maps": "lmdb:/t",
                             "smtp_tls_policy_maps": "lmdb:/p"}),
        tafile_missing=["/etc/ca.pem"],
        probes={"mail/p": PolicyProbes("encrypt", AT, [outcome])},
        deferred={"[127.0.0.1]:2525": DeferredSummary(2, AT, "TLS is required", ("A1", "B2"))},
        released=3, at=AT)
    for k, v in kw.items():
        setattr(report, k, v)
    return report


def test_a_report_survives_the_annotation_round_trip() -> None:
    report = full_report()
    annotations = report.annotations()
    assert annotations[ANN_APPLIED] == REV
    back = parse_report(annotations[ANN_REPORT])
    assert back == report
    assert back.facts is not None and back.facts.routing.relay_nexthops == ("[relay]:25",)


def test_the_time_alone_does_not_make_a_report_new() -> None:
    a, b = full_report(), full_report(at=datetime(2027, 1, 1, tzinfo=UTC))
    assert a.content() == b.content() and a.to_json() != b.to_json()
    assert full_report(released=4).content() != a.content()


def test_a_huge_report_drops_details_but_keeps_the_revision() -> None:
    many = {f"k{i}.example": DeferredSummary(1, AT, "x" * 200, (f"Q{i}",)) for i in range(2000)}
    text = full_report(deferred=many).to_json()
    assert len(text) <= MAX_REPORT
    back = parse_report(text)
    assert back.applied == REV and back.deferred == {} and back.probes == {}


def test_an_unreadable_report_is_no_report() -> None:
    assert report_of({ANN_REPORT: "{not json"}) is None
    assert report_of({ANN_REPORT: '{"at": 1}'}) is None
    assert report_of({}) is None
    bad = full_report()
    bad.probes["mail/p"].outcomes[0] = ProbeOutcome("d", "Pass", "no reason", "m", AT)
    assert report_of(bad.annotations()) is None  # not a verdict the status may carry


def test_a_claimed_probe_message_becomes_one_bounded_line() -> None:
    report = full_report()
    report.probes["mail/p"].outcomes[0] = ProbeOutcome("d", "Fail", "NoStartTLS",
                                                       "a\nb\x1b" + "x" * 5000, AT)
    [outcome] = parse_report(report.to_json()).probes["mail/p"].outcomes
    assert "\n" not in outcome.message and "\x1b" not in outcome.message
    assert len(outcome.message) <= 1024


def pod(name: str, applied: str | None, report: AgentReport | None,
        ready: bool = True) -> PodRecord:
    annotations = {} if report is None else report.annotations()
    annotations.pop(ANN_APPLIED, None)
    if applied:
        annotations[ANN_APPLIED] = applied
    return PodRecord("mail", name, "relay", f"uid-{name}", ready, annotations)


def test_the_operator_view_of_an_instance() -> None:
    other = "b" * 64
    pods = [pod("relay-0", REV, full_report()),
            pod("relay-1", other, full_report(applied=other, error="postmap: fatal: x")),
            pod("relay-2", None, None)]
    view = agent_view(pods, REV)
    assert view.updated == 1
    assert view.failure == "mail/relay-1: agent: postmap: fatal: x"
    assert view.facts is not None and view.reported
    assert view.released == 6
    assert view.deferred["[127.0.0.1]:2525"].recipients == 4
    assert set(view.probes) == {"mail/p"}
    assert view.tafile_missing == {"/etc/ca.pem"}
    # the failing pod caught up: its old error no longer counts
    pods[1] = pod("relay-1", REV, full_report(error="postmap: fatal: x"))
    assert agent_view(pods, REV).failure is None
    # a pod that is not ready is not asked
    assert agent_view([pod("relay-0", None, full_report(error="e"), ready=False)],
                      REV).failure is None


class Pol:
    def __init__(self, ref: str, tafile: tuple[str, ...]) -> None:
        self.ref, self.tafile = ref, tafile


def test_trust_anchors_are_held_only_on_an_agents_word() -> None:
    users = [Pol("mail/a", ("/etc/ca.pem",)), Pol("mail/b", ("/etc/ok.pem",))]
    unchecked = agent_trust_anchors("relay", users, agent_view([pod("relay-0", None, None)],
                                                               REV))
    assert {r for r, _ in unchecked.values()} == {"TrustAnchorUnchecked"}
    held = agent_trust_anchors("relay", users, agent_view(
        [pod("relay-0", REV, full_report())], REV))
    assert list(held) == ["mail/a"] and held["mail/a"][0] == "TrustAnchorMissing"
