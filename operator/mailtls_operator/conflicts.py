"""Which policy gets each key of a table.  Pure: no Kubernetes, no I/O.

Keys are compared as Postfix looks them up (:func:`.keys.lookup_key`): with
``smtputf8_enable = yes`` ``straße.example`` and ``strasse.example`` are one
key, and ``postmap`` would keep whichever line comes first.  So they are
contested like two spellings of one key: the stronger policy wins (DESIGN.md
§4), the loser is told, and only the winner's line is ever written.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import repeat

from .keys import lookup_key
from .policy import SOURCE_TIER, Policy


@dataclass(frozen=True)
class Loss:
    """Why a policy's key is not in the table: who won and how."""

    key: str
    winner: str
    reason: str  # Conflict | Overridden
    folded_with: str = ""
    """The winner's key when it is spelled otherwise (``straße.example`` for a lost
    ``strasse.example``): one key to Postfix once it folds case."""

    @property
    def shown(self) -> str:
        """The key for a message, saying why a differently spelled key took it."""
        if not self.folded_with:
            return self.key
        return f"{self.key} (one key with {self.folded_with} as Postfix folds case)"


LOST_TO_EXCEPTION = "Overridden"
"""A key taken by a break-glass exception (the loser's status says Overridden)."""
LOST_TO_CONFLICT = "Conflict"
"""A key taken by a stronger or older policy (the loser's Accepted says Conflict)."""


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


def loss_reason(winner: Policy, loser: Policy) -> str:
    if winner.exception is not None and loser.exception is None:
        return LOST_TO_EXCEPTION
    return LOST_TO_CONFLICT


def looked_up(keys: tuple[str, ...], smtputf8: bool) -> tuple[str, ...]:
    """``keys`` as Postfix looks them up; the very same tuple when folding changes none
    (every ASCII key the model writes is lower-case already: the common case, in C)."""
    if "".join(keys).isascii():
        return keys
    folded = tuple(lookup_key(k, smtputf8=smtputf8) for k in keys)
    return keys if folded == keys else folded


@dataclass
class Resolution:
    """The outcome over one table's policies."""

    winner: dict[str, Policy]
    """The written key (the winner's own spelling) -> the policy whose line it is."""
    losses: dict[str, list[Loss]]
    """namespace/name -> keys it declared but did not get."""
    contributed: dict[str, tuple[str, ...]]
    """namespace/name -> its keys that are in the table (won, or agreeing with the winner)."""


def resolve(chosen: Iterable[Policy], *, smtputf8: bool) -> Resolution:
    """One pass keeps, per lookup key, the policy that wins it; one more says who lost.

    Built for a million keys: the only per-key structure is one dict; a policy's
    folded keys are kept only where folding changed them.
    """
    policies = list(chosen)
    winner: dict[str, Policy] = {}  # lookup key -> policy
    spelling: dict[str, str] = {}  # lookup key -> the winner's own key, where they differ
    folded: dict[str, tuple[str, ...]] = {}  # ref -> lookup keys, where they differ
    contested: set[str] = set()
    for p in policies:
        looked = looked_up(p.keys, smtputf8)
        if looked is not p.keys:
            folded[p.ref] = looked
        elif winner.keys().isdisjoint(p.keys):  # the common case, at C speed
            winner.update(zip(p.keys, repeat(p)))
            continue
        for key, lk in zip(p.keys, looked, strict=True):
            cur = winner.get(lk)
            if cur is None or (cur is not p and beats(p, cur)):
                if cur is not None:
                    contested.add(lk)
                winner[lk] = p
                if lk != key:
                    spelling[lk] = key
                else:
                    spelling.pop(lk, None)
            elif cur is not p:
                contested.add(lk)

    losses: dict[str, list[Loss]] = {}
    contributed: dict[str, tuple[str, ...]] = {}
    for p in policies:
        looked = folded.get(p.ref, p.keys)
        if contested.isdisjoint(looked):
            contributed[p.ref] = p.keys
            continue
        mine = []
        for key, lk in zip(p.keys, looked, strict=True):
            w = winner[lk]
            if w is p or (w.value == p.value and w.exception is None and p.exception is None):
                mine.append(key)  # won, or agrees with the winner
            else:
                won = spelling.get(lk, lk)
                losses.setdefault(p.ref, []).append(Loss(
                    key, w.ref, loss_reason(w, p), won if won != key else ""))
        if mine:
            contributed[p.ref] = tuple(mine)
    if spelling:  # the line is written as its winner spelled it; Postfix folds it again
        winner = {spelling.get(k, k): p for k, p in winner.items()}
    return Resolution(winner, losses, contributed)
