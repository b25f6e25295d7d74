"""What a worker knows about its instance after the last convergence."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from ..facts import InstanceFacts
from ..observer import Observations
from ..render import Tables
from ..world import InstanceKey


@dataclass
class InstanceState:
    """One instance's tables, rollout progress, warnings and observations."""

    key: InstanceKey
    tables: Tables | None = None
    pods_total: int = 0
    pods_updated: int = 0
    failure: str | None = None
    failures: int = 0
    warnings: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    note: str = ""
    renders: int = 0
    configmap_writes: int = 0
    rollouts: int = 0
    trust_anchors: tuple[tuple[str, ...], str, frozenset[str]] | None = None
    """(paths checked, pod uid, missing): tafile checks are redone only when either changes."""
    facts: InstanceFacts | None = None
    """The instance's ``postconf`` snapshot, re-read after each rollout that changed a pod
    and by each observation that probes."""
    seen: Observations = field(default_factory=Observations)
    unreleased: set[str] = field(default_factory=set)
    """Keys whose line changed in a render that is not yet rolled out everywhere."""
    changed_keys: set[str] = field(default_factory=set)
    """Keys whose changed line is live in every ready pod: their deferred mail is released."""
    observer: asyncio.Task[None] | None = None
    observe_again: bool = False
    observe_timer: asyncio.TimerHandle | None = None
    check_live: bool = False
    """Verify pods' live revision on the next rollout (set by the periodic resync)."""
    rendered: dict[str, int] = field(default_factory=dict)
    """policy ref -> the generation the current tables were rendered from: a policy newer
    than the render is Pending, whatever the pods say."""
    seq: dict[str, int] = field(default_factory=dict)
    """Order of the revisions rendered since start (revision -> sequence number)."""
    since: dict[str, tuple[tuple[tuple[str, ...], str], str]] = field(default_factory=dict)
    """policy ref -> (its lines, the revision that first carried them): a policy is live in
    a pod whose revision is that one or later, so a change to *another* policy neither
    makes it Pending nor rewrites its status."""

    @property
    def revision(self) -> str:
        return self.tables.revision if self.tables else ""

    @property
    def smtputf8(self) -> bool:
        """The instance's ``smtputf8_enable`` (how its Postfix folds keys); yes, the
        default and the wider folding, until its facts are read."""
        return self.facts is None or self.facts.routing.smtputf8

    def note_revision(self, tables: Tables,
                      recorded: Callable[[str], tuple[list[str], str] | None]) -> None:
        """Record which revision introduced each policy's current lines.  A policy seen for
        the first time (e.g. after a restart) keeps the revision its status recorded when
        its lines are still the same, so a restart rewrites no status."""
        if tables.revision not in self.seq:
            self.seq[tables.revision] = len(self.seq)
        for ref in tables.contributors:
            key = tables.contributors.entry(ref)  # the policy's own keys and value, shared
            if ref in self.since and self.since[ref][0] == key:
                continue
            known = recorded(ref) if ref not in self.since else None
            revision = tables.revision
            if known is not None and known[1] and \
                    set(tables.contributors[ref]) <= set(known[0]):
                revision = known[1]
            self.since[ref] = (key, revision)
        for ref in set(self.since) - set(tables.contributors):
            del self.since[ref]

    def live_in(self, pod_revision: str | None, revision: str) -> bool:
        """Does a pod on ``pod_revision`` carry the lines ``revision`` introduced?  The
        current revision carries every current line; otherwise revisions are ordered by
        when this operator rendered them (unknown ones are not trusted)."""
        if pod_revision is None:
            return False
        if self.tables is not None and pod_revision == self.tables.revision:
            return True
        if pod_revision not in self.seq:
            return False
        return self.seq[pod_revision] >= self.seq.get(revision, len(self.seq))
