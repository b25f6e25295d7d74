"""What a rollout works on and reports: pod targets, the rendered table set, per-pod and
whole-rollout outcomes.  Pure."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from .. import postfix
from ..podrunner import PodRef
from ..render import REVISION_KEY

DEFAULT_MAP_PATH = "/var/lib/mailtls/tls_policy"
DEFAULT_MAP_TYPE = "lmdb"
DEFAULT_CONFIGMAP_DIR = "/etc/mailtls"
DEFAULT_SAMPLE = 5
DEFAULT_TIMEOUT = 60.0


class Step(StrEnum):
    """Where a pod's rollout stopped; also the keys of :attr:`PodOutcome.timings`."""

    WRITE = "write"
    POSTMAP = "postmap"
    SWAP = "swap"
    RELOAD = "reload"
    VERIFY = "verify"
    ANNOTATE = "annotate"


class PodStatus(StrEnum):
    APPLIED = "applied"
    """The revision was installed and verified now."""
    UNCHANGED = "unchanged"
    """The pod already had the revision: no command was run."""
    WAITING = "waiting"
    """Not an error: the mounted ConfigMap does not show the revision yet; retry soon."""
    FAILED = "failed"


INDEXED_TYPES = frozenset({"lmdb", "cdb", "hash", "btree"})
"""Table types whose file Postfix re-opens by itself when it is replaced."""


@dataclass(frozen=True)
class PodTarget:
    """A pod to bring to a revision, and where its tables live in it.

    ``transport_path`` defaults to ``transport`` beside ``map_path``.
    ``applied_revision`` is the pod's ``mailtls.io/applied-revision``
    annotation: equal to the wanted revision, the pod is left alone.
    """

    pod: PodRef
    map_path: str = DEFAULT_MAP_PATH
    map_type: str = DEFAULT_MAP_TYPE
    applied_revision: str | None = None
    transport_path: str | None = None
    configmap_dir: str = DEFAULT_CONFIGMAP_DIR
    reload: bool = False
    """Run ``postfix reload`` after the swap even for an indexed table type."""

    @property
    def needs_reload(self) -> bool:
        return self.reload or self.map_type not in INDEXED_TYPES

    def __post_init__(self) -> None:
        postfix.check_map_type(self.map_type)
        postfix.check_map_path(self.map_path)
        postfix.check_map_path(self.configmap_dir)
        if self.transport_map_path == self.map_path:
            raise postfix.InvalidArgument(
                f"transport table and TLS policy table are the same file: {self.map_path}")

    @property
    def transport_map_path(self) -> str:
        path = self.transport_path or posixpath.join(posixpath.dirname(self.map_path),
                                                     "transport")
        return postfix.check_map_path(path)


class Rendered(Protocol):
    """What :func:`TableSet.of` needs from a render result (``render.Tables``)."""

    @property
    def revision(self) -> str: ...
    @property
    def tls_policy(self) -> str: ...
    @property
    def transport(self) -> str | None: ...
    @property
    def tls_entries(self) -> Mapping[str, str]: ...
    @property
    def transport_entries(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class TableSet:
    """The tables of one revision, as rendered, plus the entries to verify against.

    ``tls_entries`` maps every key to its exact rendered value and includes
    the revision key.  ``transport`` None or empty means "no routes": an
    empty transport table is still installed, so routes that were removed
    leave the pod too.
    """

    revision: str
    tls_policy: str
    transport: str | None
    tls_entries: Mapping[str, str]
    transport_entries: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.revision:
            raise ValueError("a TableSet needs a revision")
        if REVISION_KEY not in self.tls_entries:
            raise ValueError(f"tls_entries lacks the revision key {REVISION_KEY}")

    @classmethod
    def of(cls, rendered: Rendered) -> TableSet:
        """Adopt a render result (``mailtls_operator.render.Tables``)."""
        return cls(rendered.revision, rendered.tls_policy, rendered.transport,
                   dict(rendered.tls_entries), dict(rendered.transport_entries))

    @property
    def revision_value(self) -> str:
        return self.tls_entries[REVISION_KEY]


@dataclass(frozen=True)
class PodOutcome:
    """What happened in one pod.  ``message`` is Postfix's own words on failure."""

    pod: PodRef
    revision: str
    status: PodStatus
    step: Step | None = None
    message: str = ""
    notes: tuple[str, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)
    """Seconds per step (``write``, ``postmap``, ``swap``, ``reload``, ``verify``)."""

    @property
    def ok(self) -> bool:
        return self.status in (PodStatus.APPLIED, PodStatus.UNCHANGED)

    @property
    def retryable(self) -> bool:
        """Every stop is retried with backoff; ``waiting`` is expected to clear soon."""
        return not self.ok

    @property
    def duration(self) -> float:
        return sum(self.timings.values())

    def describe(self) -> str:
        """One line for status messages and events."""
        if self.ok:
            return f"{self.pod}: {self.status.value}"
        return f"{self.pod}: {self.status.value} at {self.step}: {self.message}"


@dataclass(frozen=True)
class RolloutOutcome:
    """The result of :func:`roll_out` for one instance."""

    revision: str
    total: int
    outcomes: tuple[PodOutcome, ...]
    """One per attempted pod, in rollout order."""
    untouched: tuple[PodRef, ...]
    """Pods not attempted because the rollout stopped: still on their old table."""

    @property
    def updated(self) -> int:
        """Pods on the revision now (applied or already there)."""
        return sum(1 for o in self.outcomes if o.ok)

    @property
    def failures(self) -> tuple[PodOutcome, ...]:
        return tuple(o for o in self.outcomes if not o.ok)

    @property
    def failure(self) -> PodOutcome | None:
        """The (first) pod that stopped the rollout, if any."""
        return next(iter(self.failures), None)

    @property
    def ok(self) -> bool:
        return self.updated == self.total

    def message(self) -> str:
        """``2/3 pods at revision 9f2c…; mail/relay-1: failed at postmap: …``."""
        head = f"{self.updated}/{self.total} pods at revision {self.revision[:16]}"
        failure = self.failure
        return head if failure is None else f"{head}; {failure.describe()}"

    def failure_message(self) -> str | None:
        """None when every pod is on the revision, else :meth:`message` (for status)."""
        return None if self.failure is None else self.message()
