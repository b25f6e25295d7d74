"""The agent's pure half of the TLS outcomes: a datagram read as a session, attributed to
the key that governed it (the routing of the deferred-mail attribution), counted over a
rolling window, and reported within a byte budget the operator reads back strictly."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mailtls_operator.agent.report import MAX_REPORT, AgentReport, parse_report
from mailtls_operator.outcomes import (
    DOC_BUDGET,
    OTHER,
    SUCCESS,
    UNMATCHED,
    Attribution,
    Attributor,
    KeyOutcomes,
    LastFailure,
    OutcomeReport,
    Routes,
    Session,
    Tally,
    from_doc,
    merge_keys,
    reported_host,
    session_of,
    to_doc,
)
from mailtls_operator.routing import InstanceConfig
from mailtls_operator.tlsrpt import Report, parse

from .test_tlsrpt_parse import NO_STARTTLS, SELF_SIGNED
from .test_tlsrpt_parse import SUCCESS as SUCCESS_GRAM

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _report(data: bytes) -> Report:
    found = parse(data)
    assert isinstance(found, Report)
    return found


# -- sessions ---------------------------------------------------------------------------------


def test_a_measured_datagram_reads_as_its_result_and_a_bounded_detail() -> None:
    assert session_of(_report(SUCCESS_GRAM)) == Session("may.test", SUCCESS)
    session = session_of(_report(NO_STARTTLS))
    assert session == Session("nostarttls.test", "starttls-not-supported",
                              "starttls-not-supported at mx.nostarttls.test[127.0.0.1]")
    assert "250" not in session.detail  # the server's EHLO reply is left out
    assert session_of(_report(SELF_SIGNED)).detail.startswith(
        "validation-failure (self-signed_certificate) at mx.selfsecure.test")


def test_an_unknown_code_is_other_and_keeps_the_code() -> None:
    gram = json.loads(NO_STARTTLS)
    gram["policies"][0]["failure-details"][0]["c"] = 299
    session = session_of(_report(json.dumps(gram).encode()))
    assert (session.result, session.detail.split(" at ")[0]) == (OTHER, "other (code 299)")


# -- attribution ------------------------------------------------------------------------------


@pytest.mark.parametrize(("nexthop", "host"), [
    ("example.com", "example.com"), ("example.com:2525", "example.com"),
    ("[mx.example.com]", "mx.example.com"), ("[MX.Example.com.]:587", "mx.example.com"),
    ("[192.0.2.1]:25", None), ("[ipv6:2001:db8::1]:25", None), ("192.0.2.1", None)])
def test_the_host_tlsrpt_reports_a_nexthop_under(nexthop: str, host: str | None) -> None:
    """Measured: ``smtp:domain:port`` reports the domain, ``[host]:port`` the host, an
    IP literal nothing."""
    assert reported_host(nexthop) == host


def test_a_route_with_a_port_is_attributed_to_its_verbatim_key() -> None:
    routes = Routes(frozenset({"partner.example:2525", "other.example"}),
                    transport={"partner.example": "smtp:partner.example:2525"})
    assert Attributor(routes).attribute("PARTNER.example.") == \
        Attribution("partner.example:2525")


def test_a_domain_that_goes_to_its_mx_is_looked_up_as_postfix_does() -> None:
    """Bare next-hop: the name, then its parent domains (``.example``) in the table."""
    routes = Routes(frozenset({".example.org", "example.com"}))
    attributor = Attributor(routes)
    assert attributor.attribute("mail.example.org").key == ".example.org"
    assert attributor.attribute("example.com").key == "example.com"
    assert attributor.attribute("unknown.test") == Attribution(None)  # the global default


def test_the_relayhost_governs_under_its_own_key_not_the_recipient_domains() -> None:
    """The relayhost trap, seen from TLSRPT: the report names the relay, and a key for the
    recipient domain governed nothing."""
    config = InstanceConfig(relayhost="[smarthost.example]:587")
    routes = Routes(frozenset({"[smarthost.example]:587", "partner.example"}), config=config)
    attributor = Attributor(routes)
    assert attributor.attribute("smarthost.example").key == "[smarthost.example]:587"
    # mail to partner.example goes through the relay: a report for it cannot come from a
    # route this instance has, so only the bare name is tried (what Postfix would do)
    assert attributor.candidates("partner.example") == {"partner.example"}


def test_keys_that_differ_only_by_port_are_ambiguous_and_attributed_to_none() -> None:
    routes = Routes(frozenset({"dup.example:25", "dup.example:2525"}),
                    transport={"a.test": "smtp:dup.example:25", "b.test": "smtp:dup.example:2525"})
    assert Attributor(routes).attribute("dup.example") == Attribution(None, None, True)


def test_a_route_to_a_transport_without_tls_is_no_candidate() -> None:
    routes = Routes(frozenset({"held.example"}), transport={"held.example": "error:held"})
    assert Attributor(routes).candidates("held.example") == {"held.example"}


def test_an_audit_policys_key_is_named_beside_the_key_that_governed() -> None:
    routes = Routes(frozenset({".example.net"}), frozenset({"shop.example.net"}))
    assert Attributor(routes).attribute("shop.example.net") == \
        Attribution(".example.net", "shop.example.net")
    alone = Routes(frozenset(), frozenset({"audit.example"}))
    assert Attributor(alone).attribute("audit.example") == Attribution(None, "audit.example")


def test_answers_are_cached_within_a_bound() -> None:
    attributor = Attributor(Routes(frozenset({"a.example"})), cache=3)
    for i in range(10):
        attributor.attribute(f"h{i}.example")
    assert len(attributor._cache) <= 3


# -- the tally --------------------------------------------------------------------------------


def _failure(result: str = "certificate-expired") -> Session:
    return Session("x.example", result, f"{result} at mx.x.example[192.0.2.1]")


def test_the_window_rolls_and_the_totals_stay() -> None:
    tally = Tally(window=600, slots=6)
    tally.record("k", Session("x", SUCCESS), T0)
    tally.record("k", _failure(), T0 + timedelta(seconds=150))
    now = T0 + timedelta(seconds=200)
    [(key, o)] = tally.snapshot(now).items()
    assert key == "k" and (o.succeeded, o.failed) == (1, 1)
    assert o.total == {SUCCESS: 1, "certificate-expired": 1}
    assert o.last_failure == LastFailure("certificate-expired", _failure().detail,
                                         T0 + timedelta(seconds=150))
    later = tally.snapshot(T0 + timedelta(seconds=650))  # the first slot left the window
    assert later["k"].window == {"certificate-expired": 1}
    assert later["k"].total == {SUCCESS: 1, "certificate-expired": 1}
    assert tally.snapshot(T0 + timedelta(seconds=900)) == {}  # nothing: no traffic


def test_a_success_after_a_failure_means_no_longer_failing() -> None:
    tally = Tally()
    tally.record("k", _failure(), T0)
    assert tally.snapshot(T0)["k"].still_failing
    tally.record("k", Session("x", SUCCESS), T0 + timedelta(milliseconds=1))
    assert not tally.snapshot(T0)["k"].still_failing


def test_the_tally_keeps_at_most_max_keys() -> None:
    tally = Tally(max_keys=3)
    for i in range(10):
        tally.record(f"k{i}", Session("x", SUCCESS), T0)
    assert set(tally.snapshot(T0)) == {"k7", "k8", "k9"}


def test_merging_pods_adds_counts_and_keeps_the_latest_times() -> None:
    a = KeyOutcomes({SUCCESS: 2}, {SUCCESS: 5}, LastFailure("certificate-expired", "old", T0),
                    T0 + timedelta(seconds=1))
    b = KeyOutcomes({"certificate-expired": 1}, {"certificate-expired": 1},
                    LastFailure("certificate-expired", "new", T0 + timedelta(seconds=2)))
    merged = a.merge(b)
    assert merged.window == {SUCCESS: 2, "certificate-expired": 1}
    assert merged.last_failure is not None and merged.last_failure.detail == "new"
    assert merged.still_failing  # the latest session of the two pods failed


# -- the report document ----------------------------------------------------------------------


def _outcome_report(keys: dict[str, KeyOutcomes]) -> OutcomeReport:
    return OutcomeReport(T0, 3600, keys, socket="/var/spool/postfix/tlsrpt/sock", refused=3,
                         throttled=1)


def test_the_document_round_trips_through_the_agent_report() -> None:
    keys = {"a.example:25": KeyOutcomes({SUCCESS: 3, "validation-failure": 1},
                                        {SUCCESS: 9, "validation-failure": 1},
                                        LastFailure("validation-failure", "why", T0),
                                        T0 + timedelta(milliseconds=5))}
    report = AgentReport(wanted="r", applied="r", outcomes=_outcome_report(keys))
    back = parse_report(report.to_json()).outcomes
    assert back == _outcome_report(keys)  # milliseconds survive: the order of the two times


def test_the_document_keeps_failing_keys_first_within_its_budget() -> None:
    keys = {f"ok{i:04d}.example": KeyOutcomes({SUCCESS: 1}, {SUCCESS: 1},
                                              last_success=T0 + timedelta(seconds=i))
            for i in range(2000)}
    keys["bad.example"] = KeyOutcomes({"certificate-expired": 1}, {"certificate-expired": 1},
                                      LastFailure("certificate-expired", "x" * 300, T0))
    doc = to_doc(_outcome_report(keys))
    assert len(json.dumps(doc, separators=(",", ":"))) <= DOC_BUDGET and doc["truncated"]
    assert doc["keys"][0]["key"] == "bad.example"
    assert doc["keys"][1]["key"] == "ok1999.example"  # then the most recently active
    whole = AgentReport(outcomes=_outcome_report(keys)).to_json()
    assert len(whole) <= MAX_REPORT


@pytest.mark.parametrize("change", [
    {"windowSeconds": -1}, {"windowSeconds": True}, {"since": "2026-06-01T12:00:00"},
    {"keys": [{"key": "k", "window": {"nonsense": 1}}]},
    {"keys": [{"key": "k", "window": {SUCCESS: 2**60}}]},
    {"keys": [{"key": "k\n", "window": {}}]}, {"keys": [{"key": "", "window": {}}]},
    {"keys": [{"key": "k", "window": {}, "lastFailure": {"result": SUCCESS, "at": "x"}}]},
    {"keys": [{"key": f"k{i}", "window": {}} for i in range(1001)]}, {"keys": {}},
])
def test_the_operator_refuses_a_document_that_is_not_one(change: dict[str, Any]) -> None:
    doc = {**to_doc(_outcome_report({})), **change}
    with pytest.raises((ValueError, KeyError, TypeError)):
        from_doc(doc)


def test_detail_text_from_a_pod_is_made_one_bounded_line() -> None:
    doc = to_doc(_outcome_report({"k": KeyOutcomes({"certificate-expired": 1})}))
    doc["keys"][0]["lastFailure"] = {"result": "certificate-expired", "at": "2026-06-01T12:00:00Z",
                                     "detail": "a\nb\x1b" + "c" * 5000}
    lf = from_doc(doc).keys["k"].last_failure
    assert lf is not None and "\n" not in lf.detail and len(lf.detail) <= 300


def test_pods_of_one_instance_merge_per_key() -> None:
    one = _outcome_report({"k": KeyOutcomes({SUCCESS: 1}), UNMATCHED: KeyOutcomes({SUCCESS: 4})})
    two = _outcome_report({"k": KeyOutcomes({"certificate-expired": 2})})
    merged = merge_keys([one, two])
    assert merged["k"].window == {SUCCESS: 1, "certificate-expired": 2}
    assert merged[UNMATCHED].window == {SUCCESS: 4}
