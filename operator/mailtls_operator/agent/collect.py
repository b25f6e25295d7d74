"""The operator's side of the ``agent`` strategy: read what the agents reported (pure).

In agent mode the operator runs nothing in pods.  It writes the desired state
(the tables, and ``agent.json`` listing what to probe) and reads each pod's
``mailtls.io/*`` annotations from the pod watch it already has: the applied
revision, the agent's failure if any, the routing values for the lint, the
probes, TLS-deferred mail, unreadable trust anchors and the TLS session outcomes
(TLSRPT).  No API request and no exec is spent on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..facts import InstanceFacts
from ..mailqueue import DeferredSummary, merge_deferred
from ..observer import PolicyProbes
from ..outcomes import OutcomeReport
from ..status import TRUST_ANCHOR_MISSING, TRUST_ANCHOR_UNCHECKED
from ..world import ANN_APPLIED, PodRecord
from .report import AgentReport, report_or_refusal

STRATEGY = "agent"


@dataclass(frozen=True)
class AgentView:
    """An instance as its agents describe it."""

    updated: int
    failure: str | None
    facts: InstanceFacts | None = None
    probes: dict[str, PolicyProbes] = field(default_factory=dict)
    deferred: dict[str, DeferredSummary] = field(default_factory=dict)
    released: int = 0
    tafile_missing: frozenset[str] = frozenset()
    reported: bool = False
    """At least one ready pod has reported its routing (the lint can run)."""
    refused: tuple[str, ...] = ()
    """``ns/pod: why`` for each ready pod whose report was refused whole (unparseable)."""
    outcomes: tuple[tuple[str, OutcomeReport], ...] = ()
    """(pod uid, its TLS session outcomes) of every pod whose agent collects them, ready
    or not: a pod that stopped being ready still sent mail."""


def _reports(pods: Iterable[PodRecord]
             ) -> tuple[list[tuple[PodRecord, AgentReport]], list[tuple[PodRecord, str]]]:
    out, refused = [], []
    for pod in sorted(pods, key=lambda p: p.name):
        report = report_or_refusal(pod.annotations)
        if isinstance(report, AgentReport):
            out.append((pod, report))
        elif report is not None:
            refused.append((pod, str(report)))
    return out, refused


def agent_view(pods: Sequence[PodRecord], revision: str) -> AgentView:
    """Where the instance's pods stand for ``revision``, from their agents' reports.

    A pod is updated when its applied revision is ``revision``.  The first
    ready pod whose agent failed to install what it wanted (or refused the
    ConfigMap) names the failure, in Postfix's or the loader's own words;
    pods that have not caught up yet are merely behind (Pending).
    """
    updated = sum(1 for p in pods if p.annotations.get(ANN_APPLIED) == revision)
    ready = [p for p in pods if p.ready]
    reports, refused = _reports(ready)
    failure = next((f"{pod.namespace}/{pod.name}: agent: {r.error}" for pod, r in reports
                    if r.error and pod.annotations.get(ANN_APPLIED) != revision), None)
    if failure is None:  # a pod behind whose report cannot be read: say so, do not wait
        failure = next((f"{pod.namespace}/{pod.name}: agent report refused: {why}"
                        for pod, why in refused
                        if pod.annotations.get(ANN_APPLIED) != revision), None)
    facts = next((r.facts for _, r in reports if r.facts is not None), None)
    probes: dict[str, PolicyProbes] = {}
    for _, r in reports:  # the first pod (by name) that probed a policy speaks for it
        for ref, pp in r.probes.items():
            probes.setdefault(ref, pp)
    deferred = merge_deferred(*(r.deferred for _, r in reports))
    missing = frozenset(p for _, r in reports for p in r.tafile_missing)
    every, _ = _reports(pods) if len(ready) < len(pods) else (reports, refused)
    return AgentView(updated, failure, facts, probes, deferred,
                     sum(r.released for _, r in reports), missing, facts is not None,
                     tuple(f"{pod.namespace}/{pod.name}: {why}" for pod, why in refused),
                     tuple((pod.uid, r.outcomes) for pod, r in every if r.outcomes is not None))


class _PolicyWithTafile(Protocol):
    """What :func:`agent_trust_anchors` needs of a policy."""

    @property
    def ref(self) -> str: ...
    @property
    def tafile(self) -> tuple[str, ...]: ...


def agent_trust_anchors(instance: str, users: Sequence[_PolicyWithTafile], view: AgentView
                        ) -> dict[str, tuple[str, str]]:
    """ref -> (reason, message) for policies whose ``tafile`` the agents cannot read.

    The agents check every ``tafile`` that ``agent.json`` names (audit policies
    included) and report the unreadable ones; a policy naming one is held back
    from the table like in exec mode.  Until an agent has reported, the check
    is ``TrustAnchorUnchecked`` (said, not held back: as with ``restart``).
    """
    if not view.reported:
        return {p.ref: (TRUST_ANCHOR_UNCHECKED,
                        f"tafile {', '.join(p.tafile)} not checked in {instance} yet: no "
                        "agent has reported") for p in users}
    out: dict[str, tuple[str, str]] = {}
    for p in users:
        gone = sorted(set(p.tafile) & view.tafile_missing)
        if gone:
            out[p.ref] = (TRUST_ANCHOR_MISSING, (
                f"tafile {', '.join(gone)} is not readable in a pod of {instance} (its agent "
                f"says): this policy's lines are held back (Postfix would defer all its mail)"))
    return out
