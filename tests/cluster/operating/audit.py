"""API requests counted from kube-apiserver's own audit log, not from an emulation's counter.

The reading is :class:`testbed.auditlog.AuditTail`'s (one JSON line per stage, keyed by
``auditID``, a watch counted once); :class:`AuditLog` adds what these tests need: a mark
that resets the count (:meth:`AuditLog.mark`, like resetting a counter), the admin client
for the barrier's request, and their subresource convention.

Counting is only meaningful once the server has logged everything a test caused:
:meth:`AuditLog.barrier` makes one request of its own that nothing else makes and waits
until it shows in the log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import kubernetes.client

from testbed.auditlog import AuditTail, Request

WRITE_VERBS = ("create", "update", "patch", "delete")

__all__ = ["WRITE_VERBS", "AuditLog", "Request"]


class AuditLog:
    """The audit log of one control plane, read from a mark on."""

    def __init__(self, path: Path, client: kubernetes.client.ApiClient) -> None:
        self.path = path
        #: the barrier's client (a test whose server restarted gives it a new one)
        self.core = kubernetes.client.CoreV1Api(client)
        self.tail = AuditTail(path, self._probe)
        self._since = 0

    def _probe(self, path: str) -> None:
        self.core.read_namespace(path.rsplit("/", 1)[-1])

    def mark(self) -> None:
        """Later reads see only requests logged from now on."""
        self._since = self.tail.barrier()

    def requests(self) -> list[Request]:
        """Every request logged since the mark, once each."""
        self.tail.poll()
        return self.tail.log[self._since:]

    def select(self, verbs: str | Iterable[str] | None = None, resource: str | None = None, *,
               subresource: str | None = None, user: str | None = None,
               where: Callable[[Request], bool] | None = None) -> list[Request]:
        """Requests since the mark by verb(s), resource, subresource (None: the object
        itself, "*": any), user and any other predicate."""
        self.tail.poll()
        return self.tail.select(verbs, resource, user=user, where=where, since=self._since,
                                subresource=None if subresource == "*" else subresource or "")

    def count(self, verbs: str | Iterable[str] | None = None, resource: str | None = None,
              **kwargs: Any) -> int:
        return len(self.select(verbs, resource, **kwargs))

    def barrier(self, timeout: float = 10.0) -> None:
        """Return once the server has logged every request answered before this call."""
        self.tail.barrier(timeout)
