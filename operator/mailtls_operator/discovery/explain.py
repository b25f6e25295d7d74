"""Why a key has the line it has: which object, which source, and what it beat.

Pure: it replays the renderer's one precedence rule
(:func:`mailtls_operator.render.beats`) over every entry that names the key,
so the explanation can never disagree with the table.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from ..conflicts import looked_up
from ..keys import lookup_key
from ..policy import Policy, normalise_destination
from ..render import beats, select


def _why(winner: Policy, loser: Policy) -> str:
    if winner.exception is not None and loser.exception is None:
        return "a break-glass exception beats every ordinary policy"
    if winner.exception is not None and loser.exception is not None:
        return "of two exceptions the one expiring first wins"
    if winner.source != loser.source:
        if winner.source == "static":
            return f"an explicit policy beats a discovered one ({loser.source})"
        return f"{winner.source} beats {loser.source} (RFC 8461 §2)"
    if winner.rank != loser.rank:
        return f"the stricter level wins ({winner.level} over {loser.level})"
    if winner.value == loser.value:
        return "same line"
    return "same strength, the oldest policy wins"


def explain(key: str, policies: Iterable[Policy], *, instance: tuple[str, str] | None = None,
            now: datetime | None = None) -> tuple[str | None, list[str]]:
    """``(table line or None, explanation lines)`` for ``key``.

    ``key`` is normalised like a destination (lower-case, IDN), so the user can
    type it as Postfix would look it up; policies are matched on the key as Postfix
    folds it (``smtputf8_enable = yes``: ``strasse.example`` names ``straße.example``).
    """
    keys, errors = normalise_destination(key, "KEY")
    if errors:
        raise ValueError(str(errors[0]))
    wanted = {lookup_key(k, smtputf8=True) for k in keys}
    named = [p for p in policies if wanted & set(looked_up(p.keys, True))]
    live = select(named, instance, now)
    notes: list[str] = []
    for p in named:
        if p not in live:
            why = "audit/testing mode: probed, not written" if p.mode == "audit" else \
                "not in effect now (exception window) or not targeting this instance"
            notes.append(f"{p.ref} ({p.source}): {p.value}: {why}")
    if not live:
        return None, notes or [f"{key}: no policy names this key"]
    winner = live[0]
    for p in live[1:]:
        if beats(p, winner):
            winner = p
    first = lookup_key(keys[0], smtputf8=True)  # the line as written: the winner's spelling
    written = next((k for k in winner.keys if lookup_key(k, smtputf8=True) == first), keys[0])
    line = f"{written} {winner.value}"
    out = [f"{line}", f"  from {winner.ref} (source {winner.source})"]
    for p in live:
        if p is not winner:
            out.append(f"  beat {p.ref} ({p.source}: {p.value}): {_why(winner, p)}")
    return line, out + [f"  {n}" for n in notes]
