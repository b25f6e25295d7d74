"""Discovered state -> :class:`Policy` entries that the one renderer resolves.

A discovered line is an ordinary :class:`Policy` with ``source`` set to
``dane`` or ``mta-sts``, so the precedence rule lives in one place
(:func:`mailtls_operator.render.beats`): break-glass exception > explicit
static policy > DANE > MTA-STS.  Its name carries the source
(``partners[mta-sts]``), so the table's ``# namespace/name`` comment and every
"lost to" message say where a line came from.  MTA-STS ``testing`` becomes an
``audit``-mode entry: probed and reported, never written.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from ..policy import Policy, normalise_destination
from .decide import DomainState


class DomainInvalid(ValueError):
    """A domain that cannot be a policy-table key."""


def domain_keys(domain: str) -> tuple[str, ...]:
    """A recipient domain -> its table keys (A-label, plus U-label for an IDN)."""
    if domain.startswith((".", "[")) or ":" in domain:
        raise DomainInvalid(f"{domain!r}: a recipient domain, not a next-hop form")
    keys, errors = normalise_destination(domain, "domain")
    if errors:
        raise DomainInvalid(f"{domain!r}: {errors[0].message}")
    return tuple(keys)


def entry_name(owner: str, source: str) -> str:
    """The name of the entries an object's ``source`` produces: ``owner[source]``."""
    return f"{owner}[{source}]"


def entries(states: Iterable[DomainState], *, namespace: str = "default",
            name: str = "discovered", created: datetime | None = None,
            instances: tuple[str, ...] = ()) -> list[Policy]:
    """One entry per domain and source that yields a line (or, for testing, a probe)."""
    out: list[Policy] = []
    for state in states:
        keys = domain_keys(state.domain)
        for source, (value, mode) in sorted(state.candidates.items()):
            out.append(Policy(
                namespace=namespace, name=entry_name(name, source),
                level=value.split(" ", 1)[0], keys=keys, value=value,
                created=created or datetime(1970, 1, 1, tzinfo=UTC),
                instances=instances, mode="enforce" if mode == "enforce" else "audit",
                source=source))
    return out
