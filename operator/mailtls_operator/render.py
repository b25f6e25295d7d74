"""Policies -> Postfix tables + revision.  Pure: no Kubernetes, no I/O.

One pass over the policies keeps, per key, the entry that wins (DESIGN.md §4),
then one sort of the keys: O(n log n) in the number of entries, with no
per-key rescans.  Identical input gives byte-identical output, whatever the
order the policies arrive in, so the revision (sha256 of the tables) changes
exactly when what Postfix would do changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from .policy import SOURCE_TIER, Policy

REVISION_KEY = "mailtls-revision.invalid"
"""A key that can never be a real next-hop (RFC 2606 ``.invalid``): its value
carries the revision, so ``postmap -q`` proves which table a pod has live."""

HEADER = "# Managed by mailtls-operator from MailTLSPolicy objects: edits are overwritten."


@dataclass(frozen=True)
class Loss:
    """Why a policy's key is not in the table: who won and how."""

    key: str
    winner: str
    reason: str  # Conflict | Overridden


@dataclass(frozen=True)
class Tables:
    """The rendered tables of one instance (or of everything, offline)."""

    revision: str
    tls_policy: str
    transport: str
    tls_entries: dict[str, str]
    transport_entries: dict[str, str]
    owners: dict[str, str]
    """key -> namespace/name of the policy whose line it is."""
    losses: dict[str, list[Loss]] = field(default_factory=dict)
    """namespace/name -> keys it declared but did not get."""
    contributors: dict[str, list[str]] = field(default_factory=dict)
    """namespace/name -> table lines it contributes (``KEY VALUE``)."""

    @property
    def short_revision(self) -> str:
        return self.revision[:16]

    def revision_value(self) -> str:
        return revision_value(self.revision)


def revision_value(revision: str) -> str:
    """The value of :data:`REVISION_KEY`: valid policy syntax, never used for mail."""
    return f"secure match=rev-{revision[:16]}"


def beats(a: Policy, b: Policy) -> bool:
    """Does ``a`` win a key over ``b``?  A total order, so input order never matters.

    Break-glass exceptions beat ordinary policies; between exceptions the one
    expiring first wins.  Then the source: a team's explicit policy beats a
    discovered one, DANE beats MTA-STS.  Otherwise the stricter level wins; equal strength
    with different settings (``encrypt`` vs ``dane``, two ``secure`` with other
    names) goes to the oldest policy.
    """
    if (a.exception is None) != (b.exception is None):
        return a.exception is not None
    if a.exception is not None and b.exception is not None:
        if a.exception.expires_at != b.exception.expires_at:
            return a.exception.expires_at < b.exception.expires_at
    elif a.source != b.source and SOURCE_TIER[a.source] != SOURCE_TIER[b.source]:
        return SOURCE_TIER[a.source] > SOURCE_TIER[b.source]
    elif a.rank != b.rank:
        return a.rank > b.rank
    return a.age_key() < b.age_key()


def _loss_reason(winner: Policy, loser: Policy) -> str:
    if winner.exception is not None and loser.exception is None:
        return "Overridden"
    return "Conflict"


def select(policies: Iterable[Policy], instance: tuple[str, str] | None,
           now: datetime | None) -> list[Policy]:
    """The policies that write lines to ``instance`` (namespace, name), or all offline.

    Audit-mode policies and exceptions outside their window write nothing.
    """
    out = []
    for p in policies:
        if p.mode == "audit" or (now is not None and (p.is_expired(now) or p.is_scheduled(now))):
            continue
        if instance is not None and (p.namespace != instance[0] or not p.targets(instance[1])):
            continue
        out.append(p)
    return out


def render(policies: Iterable[Policy], *, instance: tuple[str, str] | None = None,
           now: datetime | None = None) -> Tables:
    """Render the tables for ``instance`` from every policy that targets it."""
    chosen = select(policies, instance, now)
    winner: dict[str, Policy] = {}
    for p in chosen:
        for key in p.keys:
            cur = winner.get(key)
            if cur is None or beats(p, cur):
                winner[key] = p

    losses: dict[str, list[Loss]] = {}
    contributors: dict[str, list[str]] = {}
    for p in chosen:
        for key in p.keys:
            w = winner[key]
            if w is p:
                contributors.setdefault(p.ref, []).append(f"{key} {p.value}")
            elif w.value == p.value and w.exception is None and p.exception is None:
                contributors.setdefault(p.ref, []).append(f"{key} {p.value}")  # agrees
            else:
                losses.setdefault(p.ref, []).append(Loss(key, w.ref, _loss_reason(w, p)))

    keys = sorted(winner)
    tls_entries = {k: winner[k].value for k in keys}
    owners = {k: winner[k].ref for k in keys}
    transport_entries = {k: f"smtp:{_nexthop(k)}" for k in keys if winner[k].route == "direct"}

    tls_body = _body(tls_entries, owners)
    transport_body = _body(transport_entries, owners)
    revision = hashlib.sha256(
        (tls_body + "\0" + transport_body).encode("utf-8")).hexdigest()
    where = f"{instance[0]}/{instance[1]}" if instance else "all policies"
    head = f"{HEADER}\n# instance: {where}\n# revision: {revision}\n"
    tls_text = f"{head}{REVISION_KEY} {revision_value(revision)}\n{tls_body}"
    transport_text = f"{head}{transport_body}" if transport_entries else ""
    tls_entries_all = {REVISION_KEY: revision_value(revision), **tls_entries}
    return Tables(revision=revision, tls_policy=tls_text, transport=transport_text,
                  tls_entries=tls_entries_all, transport_entries=transport_entries,
                  owners=owners, losses=losses, contributors=contributors)


def _nexthop(key: str) -> str:
    """Transport next-hop for a plain domain key: the A-label, so the TLS policy
    lookup (by next-hop) hits the same key for ASCII and SMTPUTF8 mail."""
    if key.isascii():
        return key
    import idna  # only IDN keys pay for it

    return idna.encode(key, uts46=True).decode("ascii")


def _body(entries: dict[str, str], owners: dict[str, str]) -> str:
    """``KEY VALUE`` lines sorted by key, each run of lines under a ``# ns/name`` line."""
    lines: list[str] = []
    last = None
    for key, value in entries.items():
        owner = owners[key]
        if owner != last:
            lines.append(f"# {owner}")
            last = owner
        lines.append(f"{key} {value}")
    return "".join(line + "\n" for line in lines)
