"""The operator's half of the TLS outcomes: a policy's share of its instances' sessions,
``status.outcomes``, the ``TLSFailures`` decision, the audit verdict's "observed", the
sessions counter (series only with traffic, surviving agent restarts) and the lint of an
instance that could report but does not."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mailtls_operator.controller.observing import Observations
from mailtls_operator.controller.state import InstanceState
from mailtls_operator.controller.statuses import Statuses
from mailtls_operator.facts import InstanceFacts
from mailtls_operator.metrics import Metrics
from mailtls_operator.outcome_status import (
    SessionTotals,
    observed,
    outcome_status,
    policy_outcome,
    tls_failures_condition,
    tlsrpt_lint,
)
from mailtls_operator.outcomes import (
    LASTING,
    SUCCESS,
    UNMATCHED,
    KeyOutcomes,
    LastFailure,
    OutcomeReport,
)
from mailtls_operator.render import render
from mailtls_operator.status import (
    TLS_FAILURE_REASONS,
    TLSRPT_OFF,
    WARNING_REASONS,
    event_type,
    policy_status,
)
from mailtls_operator.world import World

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _failing(result: str = "certificate-expired", at: datetime = T0,
             succeeded: int = 0, success_at: datetime | None = None) -> KeyOutcomes:
    window = {result: 2, **({SUCCESS: succeeded} if succeeded else {})}
    return KeyOutcomes(window, dict(window), LastFailure(result, f"{result} at mx", at),
                       success_at)


# -- pure ---------------------------------------------------------------------------------------


def test_a_policy_sums_its_own_keys_and_has_nothing_without_traffic() -> None:
    per_key = {"a.example": KeyOutcomes({SUCCESS: 3}, {SUCCESS: 3}, last_success=T0),
               "b.example": _failing(), "c.example": KeyOutcomes({SUCCESS: 9})}
    found = policy_outcome("relay", 3600, ["a.example", "b.example", "z.example"], per_key)
    assert found is not None
    assert (found.succeeded, found.failed, dict(found.failures)) == (
        3, 2, {"certificate-expired": 2})
    assert found.last_failure is not None and found.last_failure[0] == "b.example"
    assert [k for k, _ in found.failing] == ["b.example"]
    assert policy_outcome("relay", 3600, ["z.example"], per_key) is None
    [item] = outcome_status([found])
    assert item == {"instance": "relay", "windowSeconds": 3600, "succeeded": 3, "failed": 2,
                    "failures": [{"type": "certificate-expired", "sessions": 2}],
                    "lastFailure": {"type": "certificate-expired", "key": "b.example",
                                    "detail": "certificate-expired at mx",
                                    "time": "2026-06-01T12:00:00Z"},
                    "lastSuccess": "2026-06-01T12:00:00Z"}


@pytest.mark.parametrize("result", sorted(LASTING))
def test_a_lasting_failure_is_a_warning_named_after_it(result: str) -> None:
    found = policy_outcome("relay", 3600, ["k"], {"k": _failing(result)})
    assert found is not None
    cond = tls_failures_condition([found])
    assert cond is not None
    assert (cond.type, cond.status, cond.reason) == ("TLSFailures", "True",
                                                      TLS_FAILURE_REASONS[result])
    assert cond.message.startswith(f"{result}: 2 of 2 session(s) to k from relay failed in "
                                   "the last 1h, none succeeded since; last at ")
    assert cond.reason in WARNING_REASONS
    assert event_type({"type": cond.type, "status": cond.status, "reason": cond.reason}) \
        == "Warning"


def test_no_warning_once_a_later_session_succeeded_or_for_a_passing_failure() -> None:
    healed = _failing(succeeded=1, success_at=T0 + timedelta(seconds=1))
    transient = _failing("sts-policy-fetch-error")
    found = policy_outcome("relay", 600, ["a", "b"], {"a": healed, "b": transient})
    assert found is not None
    cond = tls_failures_condition([found])
    assert cond is not None and (cond.status, cond.reason) == ("False", "NoLastingFailures")
    assert cond.message == ("relay: 1 of 5 session(s) succeeded in the last 10m "
                            "(certificate-expired 2, sts-policy-fetch-error 2, none lasting: a "
                            "later session succeeded or retrying may heal it)")
    assert tls_failures_condition([]) is None


def test_the_latest_failing_key_leads_and_the_rest_are_counted() -> None:
    keys = {f"k{i}": _failing("certificate-expired" if i < 4 else "starttls-not-supported",
                              T0 + timedelta(seconds=i)) for i in range(5)}
    found = policy_outcome("relay", 3600, list(keys), keys)
    assert found is not None
    cond = tls_failures_condition([found])
    assert cond is not None and cond.reason == "StartTLSNotSupported"
    assert cond.message.startswith("starttls-not-supported: 2 of 2 session(s) to k4 ")
    assert "(+2 more key(s))" in cond.message


def test_the_audit_verdict_says_what_was_observed() -> None:
    found = policy_outcome("relay", 3600, ["k"], {"k": _failing(succeeded=5)})
    assert found is not None
    assert observed([found]) == ("observed under the policy in force: 7 TLS session(s) from "
                                 "relay in the last 1h, 2 failed (certificate-expired 2)")
    assert observed([]) == ""


def _report(since: datetime, **totals: int) -> OutcomeReport:
    return OutcomeReport(since, 3600, {k: KeyOutcomes({}, {SUCCESS: n})
                                       for k, n in totals.items()})


def test_session_totals_become_increments_that_survive_restarts() -> None:
    totals = SessionTotals()
    assert totals.increments([("pod-a", _report(T0, a=3))], ["pod-a"]) == {("a", SUCCESS): 3}
    assert totals.increments([("pod-a", _report(T0, a=3))], ["pod-a"]) == {}  # seen
    # a key left out of a report keeps its total; it grows from there
    assert totals.increments([("pod-a", _report(T0, b=1))], ["pod-a"]) == {("b", SUCCESS): 1}
    assert totals.increments([("pod-a", _report(T0, a=5))], ["pod-a"]) == {("a", SUCCESS): 2}
    # the agent restarted (another since): its totals count from 0 again
    later = T0 + timedelta(hours=1)
    assert totals.increments([("pod-a", _report(later, a=1))], ["pod-a"]) == {("a", SUCCESS): 1}
    # a second pod adds; a gone pod is forgotten
    assert totals.increments([("pod-b", _report(T0, a=2))], ["pod-a", "pod-b"]) == \
        {("a", SUCCESS): 2}
    totals.increments([], ["pod-b"])
    assert set(totals._seen) == {"pod-b"}


FACTS = {"mail_version": "3.10.13", "smtp_tlsrpt_enable": "yes",
         "smtp_tlsrpt_socket_name": "tlsrpt/sock", "smtp_tls_security_level": "may",
         "smtp_dns_support_level": "enabled", "queue_directory": "/var/spool/postfix"}


@pytest.mark.parametrize(("change", "error", "says"), [
    ({"smtp_tlsrpt_enable": "no"}, "", "but smtp_tlsrpt_enable = no"),
    ({"smtp_dns_support_level": "disabled"}, "", "smtp_dns_support_level = disabled"),
    ({"smtp_tls_security_level": ""}, "", "smtp_tls_security_level is empty or none"),
    ({"smtp_tlsrpt_socket_name": "private/tlsrpt"}, "", "is under private/"),
    ({"smtp_tlsrpt_socket_name": ""}, "", "smtp_tlsrpt_socket_name is empty"),
    ({}, "cannot bind /x: Permission denied", "the agent cannot receive them: cannot bind"),
])
def test_an_instance_that_could_report_but_does_not_is_linted(
        change: dict[str, str], error: str, says: str) -> None:
    note = tlsrpt_lint({**FACTS, **change}, error)
    assert note is not None and note.startswith(
        "Postfix 3.10.13 here can report its TLS sessions (TLSRPT), but ")
    assert says in note


def test_no_lint_when_it_reports_or_cannot() -> None:
    assert tlsrpt_lint(FACTS) is None
    without = {k: v for k, v in FACTS.items() if not k.startswith("smtp_tlsrpt")}
    assert tlsrpt_lint({**without, "mail_version": "3.7.11"}) is None  # no TLSRPT at all


# -- through the operator's status and metrics -------------------------------------------------


def _policy(name: str, key: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "mail", "uid": f"uid-{name}",
                         "generation": 1, "creationTimestamp": "2026-05-01T00:00:00Z"},
            "spec": {"destinations": [key], "level": "secure", "instances": ["relay"], **spec}}


class _Ctx:
    def __init__(self) -> None:
        self.metrics = Metrics()
        self.world = World(clock=lambda: T0)
        self.states: dict[tuple[str, str], InstanceState] = {}

    def strategy(self, pods: object) -> str:
        return "agent"

    def strategy_of(self, key: object) -> str:
        return "agent"


def _world() -> tuple[_Ctx, InstanceState]:
    ctx = _Ctx()
    for name, key, spec in (("enforced", "e.example", {}), ("idle", "i.example", {}),
                            ("audited", "a.example", {"mode": "audit"})):
        ctx.world.upsert_policy(_policy(name, key, **spec))
    ctx.world.upsert_pod({"metadata": {"name": "relay-0", "namespace": "mail", "uid": "pod-uid",
                                       "labels": {"mailtls.io/instance": "relay"}}})
    state = InstanceState(("mail", "relay"))
    state.tables = render([r.policy for r in ctx.world.records("mail") if r.policy],
                          instance=("mail", "relay"), now=T0)
    state.seen.outcome_window = 3600
    state.seen.outcomes = {"e.example": _failing(), "a.example": KeyOutcomes({SUCCESS: 1}),
                           UNMATCHED: KeyOutcomes({SUCCESS: 7})}
    ctx.states[("mail", "relay")] = state
    return ctx, state


def _statuses(ctx: _Ctx) -> Statuses:
    statuses = Statuses.__new__(Statuses)
    statuses.ctx = ctx  # type: ignore[assignment]
    return statuses


def test_each_policy_gets_its_outcomes_and_only_an_enforced_one_a_tls_failures_condition(
        ) -> None:
    ctx, state = _world()
    statuses = _statuses(ctx)
    records = {r.name: r for r in ctx.world.records("mail")}
    conditions, fields = statuses._observed(records["enforced"])
    assert [(c.type, c.reason) for c in conditions] == [("TLSFailures", "CertificateExpired")]
    assert fields["outcomes"][0]["failed"] == 2
    conditions, fields = statuses._observed(records["audited"])
    assert conditions == [] and fields["outcomes"][0]["succeeded"] == 1  # no probes yet
    conditions, fields = statuses._observed(records["idle"])
    assert conditions == [] and "outcomes" not in fields
    # the window empties: a stored status.outcomes is removed by the merge patch
    records["enforced"].status = {**records["enforced"].status, "outcomes": [{"x": 1}]}
    state.seen.outcomes = {}
    assert statuses._observed(records["enforced"])[1]["outcomes"] is None


def test_the_counter_has_series_only_for_policies_whose_lines_governed_traffic() -> None:
    ctx, state = _world()
    assert state.tables is not None
    async def write_statuses(namespace: str) -> None:
        return None

    observations = Observations(ctx, write_statuses, lambda: True)  # type: ignore[arg-type]
    report = OutcomeReport(T0, 3600, {
        "e.example": KeyOutcomes({}, {"certificate-expired": 2, SUCCESS: 1}),
        "a.example": KeyOutcomes({}, {SUCCESS: 4}), UNMATCHED: KeyOutcomes({}, {SUCCESS: 7})})
    observations._session_metrics(("mail", "relay"), state.tables, [("pod-uid", report)])
    observations._session_metrics(("mail", "relay"), state.tables, [("pod-uid", report)])

    def series() -> dict[tuple[str, ...], float]:
        return {tuple(s.labels.values()): s.value for m in ctx.metrics.registry.collect()
                for s in m.samples if s.name == "mailtls_tls_sessions_total"}

    assert series() == {("mail", "enforced", "relay", "certificate-expired"): 2.0,
                        ("mail", "enforced", "relay", SUCCESS): 1.0}
    grown = replace(report, keys={**report.keys, "e.example": KeyOutcomes({}, {SUCCESS: 3})})
    observations._session_metrics(("mail", "relay"), state.tables, [("pod-uid", grown)])
    assert series()[("mail", "enforced", "relay", SUCCESS)] == 3.0
    ctx.world.delete_policy("mail", "enforced")
    observations._session_metrics(("mail", "relay"), state.tables, [("pod-uid", grown)])
    assert series() == {}


def test_an_agent_instance_that_could_report_but_does_not_is_noted_in_ready() -> None:
    ctx, state = _world()
    assert state.tables is not None
    ctx.world.upsert_pod({"metadata": {
        "name": "relay-0", "namespace": "mail", "uid": "pod-uid",
        "labels": {"mailtls.io/instance": "relay"},
        "annotations": {"mailtls.io/applied-revision": state.tables.revision}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    state.rendered = {r.ref: r.policy.generation for r in ctx.world.records("mail")
                      if r.policy is not None}
    state.facts = InstanceFacts({**FACTS, "smtp_tlsrpt_enable": "no"})
    statuses = _statuses(ctx)
    rec = next(r for r in ctx.world.records("mail") if r.name == "enforced")
    [view] = statuses.views_for(rec)
    assert [r for r, _ in view.warnings] == [TLSRPT_OFF]
    ready = policy_status(rec, [view], T0)["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("True", "RolledOut")
    assert "relay: Postfix 3.10.13 here can report its TLS sessions (TLSRPT), but " \
           "smtp_tlsrpt_enable = no" in ready["message"]
    state.facts = InstanceFacts(FACTS)
    assert statuses.views_for(rec)[0].warnings == []
