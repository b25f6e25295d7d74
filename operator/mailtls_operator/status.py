"""A policy's status as a pure function of what the operator gathered.

Like cert-manager's readiness policies: a chain of checks from gathered input
to (reason, message), tested without a cluster, then written by the
controller only when it differs from what is stored.  Conditions follow the
Kubernetes API conventions (type, status, reason, message,
observedGeneration, lastTransitionTime), ``Ready`` first, so Argo CD and
Flux's kstatus read them.  Reasons are the CamelCase words below, also used
as Event reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from .crd.timefmt import format_rfc3339
from .render import LOST_TO_CONFLICT, LOST_TO_EXCEPTION, Loss
from .world import PolicyRecord

# Condition types
READY = "Ready"
ACCEPTED = "Accepted"
OVERRIDDEN = "Overridden"
VERIFIED = "Verified"
TLS_FAILURES = "TLSFailures"
"""True while an enforced policy's TLS sessions fail for a reason retrying will not heal."""

# Reasons (documented in README "Status")
VALID = "Valid"
INVALID = "Invalid"
CONFLICT = "Conflict"
ROLLED_OUT = "RolledOut"
PENDING = "Pending"
ROLLOUT_FAILED = "RolloutFailed"
NO_INSTANCES = "NoInstances"
EXPIRED = "Expired"
SCHEDULED = "Scheduled"
AUDIT_ONLY = "AuditOnly"
POLICY_BYPASSED = "PolicyBypassed"
DNSSEC_DISABLED = "DNSSECDisabled"
KEY_FOLDING = "KeyFolding"
"""A U-label key also answers for a different name once Postfix folds its case."""
TRUST_ANCHOR_MISSING = "TrustAnchorMissing"
UNSAFE_ENTRY = "UnsafeEntry"
"""The renderer refused to write the policy's lines (defence in depth, see render.py)."""
TRUST_ANCHOR_UNCHECKED = "TrustAnchorUnchecked"
DEPRECATED_PARAMETER = "DeprecatedParameter"
"""The instance's main.cf sets a TLS parameter Postfix 3.10 deprecates: a note, rolled out."""
"""A note, not a warning: the restart strategy cannot look into pods for the tafile."""
CHECK_UNAVAILABLE = "CheckUnavailable"
"""A safety check (the tafile check) could not run in the pod: the lines are held back."""
UNSUPPORTED_ATTRIBUTE = "UnsupportedAttribute"  # versions.REASON: Postfix too old for a line
BREAK_GLASS = "BreakGlass"
EXCEPTION_ACTIVE = "ExceptionActive"
PROBES_PASSED = "ProbesPassed"
PROBE_FAILED = "ProbeFailed"
TLSRPT_OFF = "TLSRPTOff"
"""A note: the instance's Postfix could report its TLS sessions (TLSRPT) but does not."""
NO_LASTING_FAILURES = "NoLastingFailures"
TLS_FAILURE_REASONS = {
    "starttls-not-supported": "StartTLSNotSupported",
    "certificate-host-mismatch": "CertificateHostMismatch",
    "certificate-not-trusted": "CertificateNotTrusted",
    "certificate-expired": "CertificateExpired",
    "validation-failure": "ValidationFailure",
    "sts-policy-invalid": "STSPolicyInvalid",
    "sts-webpki-invalid": "STSWebPKIInvalid",
    "tlsa-invalid": "TLSAInvalid",
    "dnssec-invalid": "DNSSECInvalid",
    "dane-required": "DANERequired",
}
"""RFC 8460 failures retrying does not heal -> the TLSFailures condition's reason."""

WARNING_REASONS = {INVALID, CONFLICT, ROLLOUT_FAILED, EXPIRED, POLICY_BYPASSED,
                   DNSSEC_DISABLED, KEY_FOLDING, TRUST_ANCHOR_MISSING, BREAK_GLASS, NO_INSTANCES,
                   EXCEPTION_ACTIVE, UNSAFE_ENTRY, CHECK_UNAVAILABLE, UNSUPPORTED_ATTRIBUTE,
                   *TLS_FAILURE_REASONS.values()}
MAX_ENTRIES = 500
MAX_MESSAGE = 4096
"""Characters of a condition message (the CRD allows 32768; a message quotes Postfix
and pod output, so it is bounded here and never makes the status write fail)."""


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str


@dataclass
class InstanceView:
    """One targeted instance as seen by one policy."""

    name: str
    revision: str
    pods_total: int
    pods_updated: int
    failure: str | None = None
    losses: list[Loss] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    """(reason, message): PolicyBypassed, DNSSECDisabled, TrustAnchorMissing."""
    note: str = ""


def _short(revision: str) -> str:
    return revision[:12]


def _accepted(rec: PolicyRecord, views: Sequence[InstanceView]) -> Condition:
    if rec.errors:
        return Condition(ACCEPTED, "False", INVALID, "; ".join(str(e) for e in rec.errors))
    conflicts = sorted({(lo.shown, lo.winner) for v in views for lo in v.losses
                        if lo.reason == LOST_TO_CONFLICT})
    if conflicts:
        shown = ", ".join(f"{key}: {winner} wins" for key, winner in conflicts[:5])
        more = f" (+{len(conflicts) - 5} more)" if len(conflicts) > 5 else ""
        return Condition(ACCEPTED, "False", CONFLICT,
                         f"{len(conflicts)} key(s) taken by another policy: {shown}{more}")
    assert rec.policy is not None
    return Condition(ACCEPTED, "True", VALID, f"{len(rec.policy.keys)} key(s), "
                                              f"level {rec.policy.level}")


def _overridden(views: Sequence[InstanceView]) -> Condition | None:
    beaten = sorted({(lo.shown, lo.winner) for v in views for lo in v.losses
                     if lo.reason == LOST_TO_EXCEPTION})
    if not beaten:
        return None
    shown = ", ".join(f"{key} by {winner}" for key, winner in beaten[:5])
    return Condition(OVERRIDDEN, "True", BREAK_GLASS,
                     f"break-glass exception overrides {len(beaten)} key(s): {shown}")


def _ready(rec: PolicyRecord, views: Sequence[InstanceView], now: datetime) -> Condition:
    if rec.errors:
        if rec.stale and rec.policy is not None:
            return Condition(READY, "False", INVALID,
                             f"generation {rec.generation} refused; the last good generation "
                             f"{rec.policy.generation} stays in the tables")
        return Condition(READY, "False", INVALID, "refused: not written to any table")
    policy = rec.policy
    assert policy is not None
    if policy.exception is not None and policy.is_expired(now):
        return Condition(READY, "False", EXPIRED,
                         f"exception expired at {policy.exception.expires_at.isoformat()}; "
                         "its entries were removed from the tables")
    if policy.exception is not None and policy.is_scheduled(now):
        return Condition(READY, "False", SCHEDULED,
                         f"exception starts at {policy.exception.starts_at.isoformat()}; "
                         "nothing is written before")
    if policy.mode == "audit":
        return Condition(READY, "True", AUDIT_ONLY,
                         "audit mode: nothing is written; see the Verified condition and "
                         "status.probes")
    if not views:
        return Condition(READY, "False", NO_INSTANCES,
                         f"no Postfix instance in namespace {rec.namespace} matches "
                         f"(pods labelled mailtls.io/instance"
                         f"{'=' + ','.join(rec.instances()) if rec.instances() else ''})")
    for reason in (UNSAFE_ENTRY, ROLLOUT_FAILED, TRUST_ANCHOR_MISSING, CHECK_UNAVAILABLE,
                   UNSUPPORTED_ATTRIBUTE, POLICY_BYPASSED, DNSSEC_DISABLED, KEY_FOLDING):
        msgs = [f"{v.name}: {m}" for v in views for r, m in v.warnings if r == reason]
        if reason == ROLLOUT_FAILED:
            msgs = [f"{v.name}: {v.failure}" for v in views if v.failure]
        if msgs:
            return Condition(READY, "False", reason, "; ".join(msgs))
    behind = [v for v in views if v.pods_updated < v.pods_total]
    if behind:
        return Condition(READY, "False", PENDING, "; ".join(
            f"{v.name}: {v.pods_updated}/{v.pods_total} pods on revision {_short(v.revision)}"
            for v in behind))
    notes = [f"{v.name}: {m}" for v in views for r, m in v.warnings
             if r in (TRUST_ANCHOR_UNCHECKED, DEPRECATED_PARAMETER, TLSRPT_OFF)]
    return Condition(READY, "True", ROLLED_OUT, "; ".join(
        f"{v.name}: {v.pods_updated}/{v.pods_total} pods verified revision "
        f"{_short(v.revision)}{' ' + v.note if v.note else ''}" for v in views)
        + "".join(f"; {n}" for n in notes))


def _break_glass(rec: PolicyRecord, now: datetime) -> Condition | None:
    """An exception in force is loud: its own condition (and so an Event) for its lifetime."""
    policy = rec.policy
    if rec.errors or policy is None or policy.exception is None or policy.is_expired(now) \
            or policy.is_scheduled(now):
        return None
    return Condition(BREAK_GLASS, "True", EXCEPTION_ACTIVE,
                     f"break-glass exception in force until "
                     f"{policy.exception.expires_at.isoformat()}: {policy.exception.reason}")


def conditions_for(rec: PolicyRecord, views: Sequence[InstanceView], now: datetime,
                   extra: Sequence[Condition] = ()) -> list[Condition]:
    """Ready first, then Accepted, Overridden (when beaten), BreakGlass (when one), extra."""
    out = [_ready(rec, views, now), _accepted(rec, views)]
    for cond in (_overridden(views), _break_glass(rec, now)):
        if cond:
            out.append(cond)
    out.extend(extra)
    return out


def _timestamp(now: datetime) -> str:
    return format_rfc3339(now)


def merge_conditions(previous: Sequence[dict[str, Any]], wanted: Sequence[Condition],
                     generation: int, now: datetime) -> list[dict[str, Any]]:
    """Wanted conditions in metav1 shape, keeping lastTransitionTime where status held."""
    before = {c.get("type"): c for c in previous if isinstance(c, dict)}
    out = []
    for cond in wanted:
        prev = before.get(cond.type)
        since = prev.get("lastTransitionTime") if prev and prev.get("status") == cond.status \
            else None
        message = cond.message if len(cond.message) <= MAX_MESSAGE \
            else cond.message[:MAX_MESSAGE - 15] + " ... (truncated)"
        out.append({"type": cond.type, "status": cond.status, "reason": cond.reason,
                    "message": message, "observedGeneration": generation,
                    "lastTransitionTime": since or _timestamp(now)})
    return out


def policy_status(rec: PolicyRecord, views: Sequence[InstanceView], now: datetime,
                  extra_conditions: Sequence[Condition] = (),
                  extra_fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole ``status`` of a policy."""
    lines = sorted({ln for v in views for ln in v.lines})
    status: dict[str, Any] = {
        "observedGeneration": rec.generation,
        "conditions": merge_conditions(rec.status.get("conditions") or [],
                                       conditions_for(rec, views, now, extra_conditions),
                                       rec.generation, now),
        "entries": lines[:MAX_ENTRIES] + ([f"# ... {len(lines) - MAX_ENTRIES} more"]
                                          if len(lines) > MAX_ENTRIES else []),
        "instances": [{"name": v.name, "revision": v.revision, "podsUpdated": v.pods_updated,
                       "podsTotal": v.pods_total} for v in views],
    }
    status.update(extra_fields or {})
    return status


def transitions(previous: Sequence[dict[str, Any]], current: Sequence[dict[str, Any]]
                ) -> list[dict[str, Any]]:
    """Conditions whose (status, reason) changed: each becomes a Kubernetes Event."""
    before = {(c.get("type")): (c.get("status"), c.get("reason"))
              for c in previous if isinstance(c, dict)}
    return [c for c in current if before.get(c["type"]) != (c["status"], c["reason"])]


def event_type(condition: dict[str, Any]) -> str:
    return "Warning" if condition["reason"] in WARNING_REASONS and \
        not (condition["type"] == OVERRIDDEN and condition["status"] == "False") else "Normal"


# -- Verified: what the probes of every instance say ---------------------------------


class ProbeLike(Protocol):
    """One destination probed from one pod (:class:`~.probe.ProbeOutcome`)."""

    @property
    def destination(self) -> str: ...

    @property
    def reason(self) -> str: ...

    @property
    def message(self) -> str: ...

    @property
    def failed(self) -> bool: ...

    def to_status(self) -> dict[str, str]: ...


def verified_condition(probes: Sequence[tuple[str, Sequence[ProbeLike]]]) -> Condition | None:
    """``Verified`` from (instance, outcomes) pairs: a person can act on the message."""
    outcomes = [(inst, o) for inst, found in probes for o in found]
    if not outcomes:
        return None
    failed = [(inst, o) for inst, o in outcomes if o.failed]
    if failed:
        shown = "; ".join(f"{o.destination} from {inst}: {o.reason}: {o.message}"
                          for inst, o in failed[:3])
        more = f" (+{len(failed) - 3} more)" if len(failed) > 3 else ""
        return Condition(VERIFIED, "False", PROBE_FAILED,
                         f"{len(failed)} of {len(outcomes)} probe(s) fail: {shown}{more}")
    return Condition(VERIFIED, "True", PROBES_PASSED,
                     f"{len(outcomes)} probe(s) pass the policy's level")


def probe_status(probes: Sequence[tuple[str, Sequence[ProbeLike]]]) -> list[dict[str, Any]]:
    """``status.probes[]``: one item per destination and instance."""
    return [{**o.to_status(), "instance": inst} for inst, found in probes for o in found]
