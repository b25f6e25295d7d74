"""The operator's parser of agent reports is total: any text is a report or a BadReport
(refused whole, the reason in the instance's view), bounded before parsing; the
per-instance view never mixes naive and aware times."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailtls_operator import strictjson
from mailtls_operator.agent.collect import agent_view
from mailtls_operator.agent.report import (
    ANN_REPORT,
    MAX_REPORT_READ,
    AgentReport,
    BadReport,
    parse_report,
)
from mailtls_operator.world import ANN_APPLIED, PodRecord


def _report(**changes: Any) -> str:
    doc: dict[str, Any] = json.loads(AgentReport(wanted="r1", applied="r1").to_json())
    doc["deferred"] = {"a.example": {"recipients": 2, "oldest": "2026-01-01T00:00:00Z",
                                     "reason": "TLS", "queueIds": ["Q1"]}}
    doc.update(changes)
    return json.dumps(doc)


@pytest.mark.parametrize("text", [
    "[" * 1000 + "]" * 1000,
    '{"a":' * 1000 + "1" + "}" * 1000,
    '{"released": Infinity}', '{"released": NaN}', '{"released": -Infinity}',
    '{"released": 1e999}',
    '{"released": ' + "9" * 5000 + "}",
    _report(released=2**63), _report(released=-1), _report(released=1.5),
    _report(at="2026-01-01T00:00:00"),  # naive
    _report(at="9999-12-31T23:30:00-01:00"),  # past the end of a Kubernetes timestamp
    _report(at="0001-01-01T00:30:00+01:00"),
    _report(at="2026-02-30T00:00:00Z"),
    _report(at=12),
    _report(deferred={"k": {"recipients": 1, "oldest": "2026-01-01T00:00:00",
                            "reason": "x", "queueIds": []}}),
    _report(probes="abc"),
    " " * (MAX_REPORT_READ + 1),
    '"just a string"', "[]", "", "\x00",
], ids=lambda t: repr(t)[:40])
def test_hostile_reports_are_refused_whole(text: str) -> None:
    started = time.monotonic()
    with pytest.raises(BadReport):
        parse_report(text)
    assert time.monotonic() - started < 2


_N = MAX_REPORT_READ - 10


@pytest.mark.parametrize("text", [
    '"' * _N, '"\\' * (_N // 2), "[" * _N, '{"a":' * (_N // 5), '"' + '\\"' * (_N // 2 - 1),
    "1" * _N, "[" + "1," * (_N // 2 - 1) + "1]", '"' + "a" * (_N - 1), "[" * 30 + '"' * _N,
], ids=["quotes", "quote-backslash", "brackets", "objects", "escaped-quotes", "digits",
        "long-array", "unterminated", "brackets-then-quotes"])
def test_reports_at_the_size_limit_are_judged_in_linear_time(text: str) -> None:
    """No backtracking scan: a string literal without its end costs one pass, not n^2."""
    started = time.monotonic()
    with pytest.raises(BadReport):
        parse_report(text)
    assert time.monotonic() - started < 2


def test_report_times_are_aware_utc_whatever_the_offset() -> None:
    got = parse_report(_report(at="9999-12-31T22:30:00-01:00"))
    assert got.at == datetime(9999, 12, 31, 23, 30, tzinfo=UTC)
    assert got.deferred["a.example"].oldest_arrival.tzinfo is not None
    assert parse_report(got.to_json()).at == got.at  # written back as RFC 3339


def test_a_skipped_probe_of_a_parent_domain_key_keeps_the_report() -> None:
    """The agent's own probes skip a ``.domain`` key (NotProbeable), as exec mode's do: the
    report, its outcomes and the other probes with it, must still be read."""
    probe = {"destination": ".payroll.example.com", "result": "Skipped",
             "reason": "NotProbeable", "message": "matches every subdomain",
             "time": "2026-01-01T00:00:00Z"}
    got = parse_report(_report(probes=[{"ref": "mail/payroll", "value": "encrypt",
                                        "at": "2026-01-01T00:00:00Z",
                                        "outcomes": [probe]}]))
    [outcome] = got.probes["mail/payroll"].outcomes
    assert (outcome.result, outcome.reason, outcome.failed) == ("Skipped", "NotProbeable",
                                                                False)
    with pytest.raises(BadReport, match="not a probe verdict"):
        parse_report(_report(probes=[{"ref": "mail/payroll", "value": "encrypt",
                                      "at": "2026-01-01T00:00:00Z",
                                      "outcomes": [{**probe, "result": "Maybe"}]}]))


def test_the_depth_bound_is_checked_before_json_parses() -> None:
    assert strictjson.depth('["[[[", {"a": [1]}]') == 3
    with pytest.raises(ValueError, match="nested"):
        strictjson.loads("[" * 100_000, max_bytes=1 << 20)


def _pod(name: str, report: str, applied: str = "r0") -> PodRecord:
    return PodRecord(namespace="mail", name=name, instance="relay", uid=name, ready=True,
                     annotations={ANN_REPORT: report, ANN_APPLIED: applied})


def test_one_pods_refused_report_is_named_in_the_view_and_others_still_count() -> None:
    pods = [_pod("relay-0", _report(at="2026-01-01T00:00:00+05:00")),
            _pod("relay-1", _report(at="2026-01-01T00:00:00")),  # naive: refused
            _pod("relay-2", _report(deferred={"a.example": {
                "recipients": 1, "oldest": "2025-12-31T23:00:00-02:00", "reason": "TLS",
                "queueIds": ["Q2"]}}))]
    view = agent_view(pods, "r1")
    assert view.failure is not None and "relay-1: agent report refused" in view.failure
    assert len(view.refused) == 1
    assert view.deferred["a.example"].recipients == 3  # aware times compared, no TypeError


json_text = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=30).map(lambda v: json.dumps(v, allow_nan=True))
report_like = st.fixed_dictionaries({}, optional={
    key: st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=30),
                   st.datetimes(timezones=st.none() | st.timezones()).map(
                       lambda d: d.isoformat()))
    for key in ("wanted", "applied", "error", "released", "at", "facts", "tafileMissing")
}).map(json.dumps)


@settings(max_examples=400, deadline=2000)
@given(st.one_of(st.text(max_size=300), json_text, report_like))
def test_any_text_is_a_report_or_a_refusal(text: str) -> None:
    try:
        got = parse_report(text)
    except BadReport as exc:
        assert "\n" not in str(exc) and len(str(exc)) <= 300
        return
    assert got.at.tzinfo is not None
