"""Discovered state as people and the API read it: status entries and explanations.

Pure.  ``domain_status`` is one ``status.domains[]`` item of a MailTLSDiscovery
(source, mode, mx, id, fetchedAt, expiresAt, lastError, the line and who beat
it); ``describe`` is what ``mailtls discover`` prints on stderr.  A change of
``id``, ``mode`` or ``mx`` between two statuses is what raises an Event and
bumps the change metric (:func:`changes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..policy import parse_time
from ..render import Loss
from .decide import DANE, MTA_STS, CachedSts, DomainState, sts_value
from .mtasts import MODES, StsError, StsPolicy, _mx_pattern


def _iso(value: Any) -> str:
    return value.isoformat().replace("+00:00", "Z") if value is not None else ""


def domain_status(state: DomainState, losses: list[Loss] | None = None) -> dict[str, Any]:
    """One ``status.domains[]`` item."""
    out: dict[str, Any] = {"domain": state.domain, "source": "", "mode": "", "mx": [],
                           "id": "", "fetchedAt": "", "expiresAt": "", "lastError": ""}
    candidates = state.candidates
    sts = state.sts
    if sts is not None and sts.cached is not None:
        cached = sts.cached
        out.update(id=cached.id, fetchedAt=_iso(cached.fetched_at),
                   expiresAt=_iso(cached.expires_at), mode=cached.policy.mode,
                   mx=list(cached.policy.mx))
        if MTA_STS in candidates:
            out["source"] = MTA_STS
    if DANE in candidates:
        out.update(source=DANE, mode=candidates[DANE][0])
    errors = [o.error for o in (sts,) if o is not None and o.error]
    if state.dane is not None and not state.dane.decided:
        errors.append(state.dane.reason)
    out["lastError"] = "; ".join(errors)
    winner = candidates.get(DANE) or candidates.get(MTA_STS)
    if winner is not None:
        out["entry"] = winner[0] if winner[1] == "enforce" else ""
        if winner[1] != "enforce":
            out["wouldEnforce"] = winner[0]
    reasons = []
    if state.dane is not None:
        reasons.append(f"dane: {state.dane.reason}")
    if sts is not None:
        reasons.extend(f"mta-sts: {n}" for n in sts.notes)
    out["reasons"] = reasons
    if losses:
        out["overriddenBy"] = sorted({loss.winner for loss in losses})
    return out


def describe(state: DomainState) -> list[str]:
    """Explanation lines for one domain (``mailtls discover`` writes them to stderr)."""
    d = state.domain
    lines: list[str] = []
    if state.dane is not None:
        lines.append(f"{d}: dane: {state.dane.reason}")
    sts = state.sts
    if sts is not None:
        lines.extend(f"{d}: mta-sts: {note}" for note in sts.notes)
        if sts.error:
            lines.append(f"{d}: mta-sts: error: {sts.error}")
        if sts.cached is not None:
            policy = sts.cached.policy
            what = {"enforce": "enforced", "testing": "testing: not written, would enforce",
                    "none": "mode none: nothing written"}[policy.mode]
            value = f" {sts_value(policy)!r}" if policy.mode != "none" else ""
            lines.append(f"{d}: mta-sts: id {sts.cached.id}, mode {policy.mode}, mx "
                         f"{', '.join(policy.mx) or '-'}, expires "
                         f"{_iso(sts.cached.expires_at)}: {what}{value}")
    candidates = state.candidates
    if DANE in candidates and MTA_STS in candidates:
        lines.append(f"{d}: dane wins over mta-sts (RFC 8461 §2)")
    if not state.decided:
        lines.append(f"{d}: undecided: a lookup failed")
    elif not any(mode == "enforce" for _, mode in candidates.values()):
        lines.append(f"{d}: no line")
    return lines


def changes(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """What changed in a domain's id, mode or MX list (empty: nothing to tell)."""
    if old is None:
        return []
    out = []
    for name in ("id", "mode", "mx"):
        if old.get(name) != new.get(name) and (old.get(name) or new.get(name)):
            out.append(f"{name} {old.get(name) or '-'} -> {new.get(name) or '-'}")
    return out


def cached_from_status(item: Mapping[str, Any]) -> CachedSts | None:
    """The MTA-STS cache a previous operator recorded in ``status.domains[]``, if usable.

    After a restart or a leader change the policy cache must survive (RFC 8461 §5.1: a
    failed refresh keeps the unexpired policy), so it is rebuilt from the status.  Every
    field is checked as if it came from the partner: bad values mean no cache.
    """
    try:
        fetched = parse_time(str(item["fetchedAt"]))
        expires = parse_time(str(item["expiresAt"]))
        mode, ident = str(item["mode"]), str(item["id"])
        mx = tuple(_mx_pattern(str(m)) for m in item.get("mx") or [])
    except (KeyError, ValueError, StsError):
        return None
    max_age = int((expires - fetched).total_seconds())
    if mode not in MODES or not ident.isalnum() or max_age <= 0 or (mode != "none" and not mx):
        return None
    return CachedSts(ident, StsPolicy(mode, max_age, mx), fetched)
