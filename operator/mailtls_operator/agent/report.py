"""What an agent tells the operator about its pod, as pod annotations (pure, both sides).

The agent patches only its own pod, only these keys (the chart's
ValidatingAdmissionPolicy refuses anything else, see DESIGN.md §11 and
docs/agent.md):

- ``mailtls.io/applied-revision``: the revision live and verified in the pod,
  the same annotation the ``exec`` strategy writes, so status ("podsUpdated",
  ``Ready=RolledOut``) is computed the same way in both modes;
- ``mailtls.io/agent-report``: one JSON object (:class:`AgentReport`): the
  revision the agent wants and whether it failed (Postfix's own words), the
  instance's routing values (``postconf -x``, for the relayhost/DNSSEC lint),
  unreadable trust-anchor files, the last probes, TLS-deferred mail by key,
  how many messages it released, and its Postfix's TLS session outcomes by key
  (TLSRPT, :mod:`..outcomes`; at most :data:`..outcomes.DOC_BUDGET` bytes).

Why annotations and not an HTTP endpoint the operator scrapes: the operator
already watches these pods, so a report costs no extra request and reaches it
through the watch; the agent needs no listening port, no TLS certificate and
no TokenReview; and the operator needs no network path into mail pods.  The
agent's power is one verb (``patch pods``), narrowed to its own pod and to two
annotation keys by admission, where RBAC alone cannot name a pod it does not
know the name of.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .. import strictjson
from ..crd.timefmt import parse_rfc3339
from ..facts import InstanceFacts
from ..mailqueue import DeferredSummary
from ..observer import PolicyProbes
from ..outcomes import OutcomeReport, from_doc, to_doc
from ..probe import FAIL, PASS, SKIPPED, ProbeOutcome, clean, rfc3339

ANN_APPLIED = "mailtls.io/applied-revision"
ANN_REPORT = "mailtls.io/agent-report"
AGENT_ANNOTATIONS = (ANN_APPLIED, ANN_REPORT)
"""The only annotations an agent may write (the admission policy's list)."""
_REASON = re.compile(r"[A-Z][A-Za-z0-9]{0,63}")
MAX_REPORT = 128 * 1024
"""Bytes; past this the probe and deferred details are cut (annotations total 256 KiB)."""
MAX_REPORT_READ = 256 * 1024
"""Bytes; a longer annotation is refused unparsed (the API server's limit on all of a
pod's annotations together: no agent of ours writes one)."""


MAX_COUNT = 2**31 - 1
"""Largest count (recipients, released) believed: status fields are int64, a queue far less."""


def _time(text: Any) -> datetime:
    """A pod's time -> aware UTC.  A naive time (no offset) is refused: pods' clocks are
    compared with each other and with the operator's, never naive with aware; a time a
    Kubernetes timestamp cannot hold (year 9999 with a negative offset) is refused."""
    if not isinstance(text, str):
        raise ValueError(f"time must be a string, not {type(text).__name__}")
    return parse_rfc3339(text)


def _count(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"count must be an integer 0..{MAX_COUNT}")
    return value


@dataclass
class AgentReport:
    """One agent's view of its pod."""

    wanted: str = ""
    """The newest valid revision the agent has seen."""
    applied: str = ""
    error: str = ""
    """Why ``wanted`` is not live (empty when it is)."""
    source: str = ""
    """Where ``wanted`` came from: ``api`` or ``volume`` (during an API outage)."""
    api_error: str = ""
    facts: InstanceFacts | None = None
    """The pod's ``postconf -x`` values the operator's lint needs (routing, DNSSEC)."""
    tafile_missing: list[str] = field(default_factory=list)
    probes: dict[str, PolicyProbes] = field(default_factory=dict)
    deferred: dict[str, DeferredSummary] = field(default_factory=dict)
    released: int = 0
    outcomes: OutcomeReport | None = None
    """TLS sessions by governing key (None: the agent collects none)."""
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_json(self, *, with_time: bool = True) -> str:
        doc: dict[str, Any] = {
            "wanted": self.wanted, "applied": self.applied, "error": self.error,
            "source": self.source, "apiError": self.api_error,
            "facts": None if self.facts is None else dict(self.facts.values),
            "tafileMissing": self.tafile_missing, "released": self.released,
            "probes": [{"ref": ref, "value": pp.value, "at": rfc3339(pp.at),
                        "outcomes": [o.to_status() for o in pp.outcomes]}
                       for ref, pp in sorted(self.probes.items())],
            "deferred": {k: {"recipients": d.recipients, "oldest": rfc3339(d.oldest_arrival),
                             "reason": d.sample_reason, "queueIds": list(d.queue_ids)}
                         for k, d in sorted(self.deferred.items())},
        }
        if self.outcomes is not None:
            doc["outcomes"] = to_doc(self.outcomes)
        if with_time:
            doc["at"] = rfc3339(self.at)
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        if len(text) > MAX_REPORT:  # never fail to report the revision for want of room
            doc["probes"], doc["deferred"], doc["truncated"] = [], {}, True
            text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return text

    def content(self) -> str:
        """The report without its time: what decides whether it must be sent again."""
        return self.to_json(with_time=False)

    def touch(self) -> None:
        self.at = datetime.now(UTC)

    def annotations(self) -> dict[str, str]:
        out = {ANN_REPORT: self.to_json()}
        if self.applied:
            out[ANN_APPLIED] = self.applied
        return out


class BadReport(ValueError):
    """An annotation that is not a report this version understands."""


def _outcome(o: Mapping[str, Any]) -> ProbeOutcome:
    """A probe outcome as a pod claims it: the words status will carry are checked (a
    result, a CamelCase reason) and the message is made one printable, bounded line."""
    result, reason = str(o["result"]), str(o["reason"])
    # Skipped too: the agent's own probes skip a ``.domain`` key (NotProbeable), as the
    # exec strategy's do; refusing it would refuse the whole report, outcomes included.
    if result not in (PASS, FAIL, SKIPPED) or not _REASON.fullmatch(reason):
        raise ValueError(f"not a probe verdict: {result!r} {reason!r}")
    return ProbeOutcome(clean(str(o["destination"]), 255), result, reason,
                        clean(str(o["message"])), _time(o["time"]))


def parse_report(text: str) -> AgentReport:
    """The operator's side: read ``mailtls.io/agent-report``; raise :class:`BadReport`.

    The annotation is written by a pod, so it is read as untrusted input: anything
    that is not a report of this shape is refused whole -- bounded in size and depth
    before parsing (:mod:`..strictjson`), no NaN/Infinity/huge numbers, times aware
    and within Kubernetes' range (normalised to UTC), counts bounded.  Total: only
    :class:`BadReport` is raised, whatever ``text`` is.
    """
    try:
        doc = strictjson.loads(text, max_bytes=MAX_REPORT_READ)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        probes = {
            str(p["ref"]): PolicyProbes(str(p["value"]), _time(p["at"]),
                                        [_outcome(o) for o in p["outcomes"]])
            for p in doc.get("probes", [])}
        deferred = {
            str(k): DeferredSummary(_count(d["recipients"]), _time(d["oldest"]), str(d["reason"]),
                                    tuple(str(q) for q in d["queueIds"]))
            for k, d in (doc.get("deferred") or {}).items()}
        facts = doc.get("facts")
        outcomes = doc.get("outcomes")
        return AgentReport(
            wanted=str(doc.get("wanted", "")), applied=str(doc.get("applied", "")),
            error=str(doc.get("error", "")), source=str(doc.get("source", "")),
            api_error=str(doc.get("apiError", "")),
            facts=InstanceFacts({str(k): str(v) for k, v in facts.items()})
            if facts else None,
            tafile_missing=[str(x) for x in doc.get("tafileMissing", [])],
            probes=probes, deferred=deferred, released=_count(doc.get("released", 0)),
            outcomes=from_doc(outcomes) if outcomes is not None else None,
            at=_time(doc["at"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadReport(clean(f"{ANN_REPORT}: {type(exc).__name__}: {exc}"[:1000], 300)) from exc


def report_of(annotations: Mapping[str, str]) -> AgentReport | None:
    """The pod's report, or None when it has none (or one that does not parse)."""
    found = report_or_refusal(annotations)
    return found if isinstance(found, AgentReport) else None


def report_or_refusal(annotations: Mapping[str, str]) -> AgentReport | BadReport | None:
    """The pod's report, why it was refused, or None when the pod has none."""
    text = annotations.get(ANN_REPORT)
    if not text:
        return None
    try:
        return parse_report(text)
    except BadReport as exc:
        return exc
