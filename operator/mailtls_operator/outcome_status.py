"""The operator's half of the TLS outcomes: per policy, per instance.  Pure.

The agents report TLS sessions per governing key (:mod:`.outcomes`); here:

- :func:`policy_outcome` sums an instance's keys into one policy's outcome: the keys
  whose line the policy owns in the table (an enforced policy), or its own keys (an
  audit policy: those sessions ran under whatever governs the destination today);
- :func:`outcome_status` is ``status.outcomes``: one item per instance with traffic
  in the window, nothing for a policy without;
- :func:`tls_failures_condition` decides the ``TLSFailures`` warning of an enforced
  policy: a key whose last session failed for a reason retrying will not heal
  (:data:`.outcomes.LASTING`), named in the reason and the message;
- :func:`observed` is the audit verdict's "observed" beside "probed";
- :class:`SessionTotals` turns the agents' totals (since each agent started) into
  increments of ``mailtls_tls_sessions_total``, surviving agent restarts;
- :func:`tlsrpt_lint` says why an instance that could report does not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .crd.timefmt import format_rfc3339
from .outcomes import LASTING, SUCCESS, KeyOutcomes, LastFailure, OutcomeReport
from .status import NO_LASTING_FAILURES, TLS_FAILURE_REASONS, TLS_FAILURES, Condition
from .tlsrpt import socket_name_problem

SHOWN = 3
"""Failing keys named in one condition message at most (the rest are counted)."""


@dataclass(frozen=True)
class PolicyOutcome:
    """One policy's TLS sessions on one instance, over the agents' window."""

    instance: str
    window_seconds: int
    succeeded: int
    failed: int
    failures: Mapping[str, int]
    last_failure: tuple[str, LastFailure] | None
    """(key, failure) of the latest failure."""
    last_success: datetime | None
    failing: tuple[tuple[str, KeyOutcomes], ...] = ()
    """Keys whose last session failed for a lasting reason, latest first."""


def policy_outcome(instance: str, window_seconds: int, keys: Iterable[str],
                   per_key: Mapping[str, KeyOutcomes]) -> PolicyOutcome | None:
    """``keys``' share of the instance's outcomes; None when they had no session."""
    found = [(k, o) for k in dict.fromkeys(keys) if (o := per_key.get(k)) is not None
             and (o.succeeded or o.failed)]
    if not found:
        return None
    failures: dict[str, int] = {}
    for _, o in found:
        for result, n in o.window.items():
            if result != SUCCESS:
                failures[result] = failures.get(result, 0) + n
    last = max(((k, o.last_failure) for k, o in found if o.last_failure is not None),
               key=lambda kf: kf[1].at, default=None)
    failing = sorted(((k, o) for k, o in found if o.still_failing
                      and o.last_failure is not None and o.last_failure.result in LASTING),
                     key=lambda ko: ko[1].last_failure.at if ko[1].last_failure else 0,
                     reverse=True)
    return PolicyOutcome(
        instance, window_seconds, sum(o.succeeded for _, o in found),
        sum(o.failed for _, o in found), dict(sorted(failures.items())), last,
        max((o.last_success for _, o in found if o.last_success is not None), default=None),
        tuple(failing))


def _window(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def outcome_status(items: Sequence[PolicyOutcome]) -> list[dict[str, Any]]:
    """``status.outcomes``: one item per instance with sessions in the window."""
    out = []
    for o in sorted(items, key=lambda o: o.instance):
        item: dict[str, Any] = {
            "instance": o.instance, "windowSeconds": o.window_seconds,
            "succeeded": o.succeeded, "failed": o.failed,
            "failures": [{"type": t, "sessions": n} for t, n in o.failures.items()]}
        if o.last_failure is not None:
            key, lf = o.last_failure
            item["lastFailure"] = {"type": lf.result, "key": key, "detail": lf.detail,
                                   "time": format_rfc3339(lf.at)}
        if o.last_success is not None:
            item["lastSuccess"] = format_rfc3339(o.last_success)
        out.append(item)
    return out


def tls_failures_condition(items: Sequence[PolicyOutcome]) -> Condition | None:
    """``TLSFailures`` of an enforced policy: True, its reason the latest lasting failure
    (``CertificateExpired``...), while a key's last session failed for such a reason;
    False while sessions go through; absent without sessions."""
    if not items:
        return None
    failing = sorted(((o, k, ko) for o in items for k, ko in o.failing),
                     key=lambda x: x[2].last_failure.at if x[2].last_failure else 0,
                     reverse=True)
    if failing:
        shown = []
        for o, key, ko in failing[:SHOWN]:
            lf = ko.last_failure
            assert lf is not None
            shown.append(
                f"{lf.result}: {ko.failed} of {ko.succeeded + ko.failed} session(s) to {key} "
                f"from {o.instance} failed in the last {_window(o.window_seconds)}, none "
                f"succeeded since; last at {format_rfc3339(lf.at)}: {lf.detail}")
        more = f" (+{len(failing) - SHOWN} more key(s))" if len(failing) > SHOWN else ""
        lf = failing[0][2].last_failure
        assert lf is not None
        return Condition(TLS_FAILURES, "True", TLS_FAILURE_REASONS[lf.result],
                         "; ".join(shown) + more + ". Retrying will not heal this: the "
                         "destination's server or certificate, or the policy, must change")
    parts = []
    for o in sorted(items, key=lambda o: o.instance):
        text = (f"{o.instance}: {o.succeeded} of {o.succeeded + o.failed} session(s) "
                f"succeeded in the last {_window(o.window_seconds)}")
        if o.failed:
            text += " (" + ", ".join(f"{t} {n}" for t, n in o.failures.items()) + \
                ", none lasting: a later session succeeded or retrying may heal it)"
        parts.append(text)
    return Condition(TLS_FAILURES, "False", NO_LASTING_FAILURES, "; ".join(parts))


def observed(items: Sequence[PolicyOutcome]) -> str:
    """The audit verdict's "observed" part: what the instances' own traffic to the policy's
    destinations did under the policy in force today ("" without traffic)."""
    parts = []
    for o in sorted(items, key=lambda o: o.instance):
        text = (f"{o.succeeded + o.failed} TLS session(s) from {o.instance} in the last "
                f"{_window(o.window_seconds)}, {o.failed} failed")
        if o.failures:
            text += " (" + ", ".join(f"{t} {n}" for t, n in o.failures.items()) + ")"
        parts.append(text)
    return ("observed under the policy in force: " + "; ".join(parts)) if parts else ""


class SessionTotals:
    """Each pod's totals since its agent started -> increments of the sessions counter.

    A pod is known by its uid; its agent's ``since`` changing means the agent restarted
    and counts from 0 again, so its totals count whole.  A key missing from a report
    (left out for size, or out of the window) keeps its last total: a counter never goes
    back.  Pods that are gone are forgotten."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[datetime, dict[tuple[str, str], int]]] = {}

    def increments(self, reports: Iterable[tuple[str, OutcomeReport]],
                   alive: Iterable[str]) -> dict[tuple[str, str], int]:
        """(key, result) -> sessions since the last call, over ``reports`` (pod uid, report);
        ``alive`` are the uids of the instance's pods now."""
        out: dict[tuple[str, str], int] = {}
        for uid, report in reports:
            since, before = self._seen.get(uid, (report.since, {}))
            if since != report.since:
                before = {}
            for key, o in report.keys.items():
                for result, n in o.total.items():
                    grew = n - before.get((key, result), 0)
                    if grew > 0:
                        out[(key, result)] = out.get((key, result), 0) + grew
                        before[(key, result)] = n
            self._seen[uid] = (report.since, before)
        for uid in set(self._seen) - set(alive):
            del self._seen[uid]
        return out


def tlsrpt_lint(values: Mapping[str, str], collector_error: str = "") -> str | None:
    """Why an instance whose Postfix knows TLSRPT reports no TLS sessions, or None (also
    None for a Postfix without TLSRPT: before 3.10, or built without libtlsrpt)."""
    enabled = values.get("smtp_tlsrpt_enable")
    if enabled is None:
        return None
    version = values.get("mail_version", "")
    could = f"Postfix {version} here can report its TLS sessions (TLSRPT)".replace("  ", " ")
    why = None
    if enabled.strip().lower() != "yes":
        why = f"smtp_tlsrpt_enable = {enabled or 'no'}"
    elif values.get("smtp_dns_support_level", "").strip().lower() == "disabled":
        why = "smtp_dns_support_level = disabled (Postfix turns TLSRPT off without DNS)"
    elif values.get("smtp_tls_security_level", "").strip().lower() in ("", "none"):
        why = ("smtp_tls_security_level is empty or none (Postfix reports only when the "
               "global level is may or above, whatever the policy table says)")
    elif (problem := socket_name_problem(values.get("smtp_tlsrpt_socket_name", ""))):
        why = problem
    elif collector_error:
        why = f"the agent cannot receive them: {collector_error}"
    if why is None:
        return None
    return (f"{could}, but {why}: status.outcomes stays empty (docs/tlsrpt.md says what to "
            "set)")
