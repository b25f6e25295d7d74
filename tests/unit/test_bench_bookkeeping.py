"""``make bench``'s bookkeeping: each row beside the previous run's, and the operator's
requests counted from kube-apiserver's audit log (the figures themselves are measured,
never asserted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import common
from bench.common import Result, Summary, attach_previous, summary_rows
from testbed.auditlog import AuditTail


def _doc(config: dict[str, Any], rows: list[tuple[str, float]]) -> dict[str, Any]:
    return {"name": "x", "config": config,
            "summary": [{"metric": m, "value": v} for m, v in rows]}


def test_a_row_gets_the_previous_runs_value_matched_by_name_without_its_counts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(common.PREVIOUS, "x", _doc(
        {"api_server": "real"}, [("sent / re-rolls verified (10)", 100.0), ("p50", 2.0)]))
    result = Result("x", "t", config={"api_server": "real"}, summary=[
        Summary("x", "sent / re-rolls verified (12)", 120, "msgs"),
        Summary("x", "p50", 1.0, "s"), Summary("x", "new row", 3.0, "s")])
    attach_previous(result)
    sent, p50, new = result.summary
    assert (sent.previous, sent.vs_previous) == (100.0, 1.2)
    assert (p50.previous, p50.vs_previous) == (2.0, 0.5)
    assert (new.previous, new.vs_previous) == (None, None)
    assert not any(s.previous_emulated for s in result.summary)


def test_a_previous_value_from_the_api_emulation_is_marked_as_such(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(common.PREVIOUS, "x", _doc({}, [("p50", 2.0)]))
    result = Result("x", "t", config={"api_server": "real"},
                    summary=[Summary("x", "p50", 1.0, "s")])
    attach_previous(result)
    [row] = result.summary
    assert row.previous_emulated
    assert summary_rows([row])[0][5] == "2.00 s (emu)"


def _event(audit_id: str, stage: str, verb: str, resource: str, user: str,
           subresource: str = "") -> bytes:
    ref = {"resource": resource, "namespace": "ns", "name": "n"}
    if subresource:
        ref["subresource"] = subresource
    return json.dumps({"auditID": audit_id, "stage": stage, "verb": verb, "objectRef": ref,
                       "user": {"username": user},
                       "stageTimestamp": "2026-12-07T23:00:00.000000Z"}).encode() + b"\n"


def test_the_audit_tail_counts_a_watch_once_and_waits_for_a_line_being_written(
        tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    log.write_bytes(b"")
    tail = AuditTail(log, probe=lambda path: None)
    with log.open("ab") as f:
        f.write(_event("w1", "ResponseStarted", "watch", "pods", "op"))
        f.write(_event("p1", "ResponseComplete", "patch", "mailtlspolicies", "op", "status"))
        f.write(_event("c1", "ResponseComplete", "create", "mailtlspolicies", "admin"))
        f.write(_event("w1", "ResponseComplete", "watch", "pods", "op")[:40])  # half a line
    assert tail.poll() == 3
    with log.open("ab") as f:
        f.write(_event("w1", "ResponseComplete", "watch", "pods", "op")[40:])
    assert tail.poll() == 3  # the watch's second stage is the same request
    assert tail.count("watch", "pods", user="op") == 1
    assert tail.count("patch", "mailtlspolicies", subresource="status", user="op") == 1
    assert tail.count("patch", "mailtlspolicies", user="op") == 0  # not the object itself
    assert tail.count(None, None, subresource=None, user="op") == 2
    assert tail.by_kind(user="admin") == {"create mailtlspolicies": 1}
