"""API requests counted from kube-apiserver's own audit log, not from an emulation's counter.

The control plane writes one JSON line per audit event (policy level ``Metadata``, stage
``RequestReceived`` omitted). A watch is logged when its response starts and again when it
ends; everything else when its response is complete. Requests are therefore keyed by their
``auditID``, so a watch counts once.

Counting is only meaningful once the server has logged everything a test caused:
:meth:`AuditLog.barrier` makes one request of its own that nothing else makes and waits
until it shows in the log (the log backend writes in the request's path, so earlier
requests are there by then).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes.client

WRITE_VERBS = ("create", "update", "patch", "delete")


@dataclass(frozen=True)
class Request:
    """One API request as the server audited it."""

    audit_id: str
    verb: str
    resource: str | None
    subresource: str | None
    namespace: str | None
    name: str | None
    user: str
    user_agent: str
    uri: str
    code: int | None

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.uri).query)

    def param(self, key: str) -> str | None:
        values = self.query.get(key)
        return values[0] if values else None

    @property
    def label_selector(self) -> str | None:
        return self.param("labelSelector")

    @property
    def limit(self) -> int | None:
        text = self.param("limit")
        return int(text) if text is not None else None


def _request(event: dict[str, Any]) -> Request:
    ref = event.get("objectRef") or {}
    status = event.get("responseStatus") or {}
    return Request(audit_id=event["auditID"], verb=event.get("verb", ""),
                   resource=ref.get("resource"), subresource=ref.get("subresource"),
                   namespace=ref.get("namespace"), name=ref.get("name"),
                   user=(event.get("user") or {}).get("username", ""),
                   user_agent=event.get("userAgent", ""), uri=event.get("requestURI", ""),
                   code=status.get("code"))


class AuditLog:
    """The audit log of one control plane, read from a mark on (like resetting a counter)."""

    def __init__(self, path: Path, client: kubernetes.client.ApiClient) -> None:
        self.path = path
        self.core = kubernetes.client.CoreV1Api(client)
        self._offset = 0

    def mark(self) -> None:
        """Later reads see only requests logged from now on."""
        self.barrier()
        self._offset = self.path.stat().st_size if self.path.exists() else 0

    def requests(self) -> list[Request]:
        """Every request logged since the mark, once each (the last stage wins)."""
        by_id: dict[str, Request] = {}
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self._offset)
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # a line still being written: the next read has it whole
                event = json.loads(raw)
                by_id[event["auditID"]] = _request(event)
        return list(by_id.values())

    def select(self, verbs: str | Iterable[str] | None = None, resource: str | None = None, *,
               subresource: str | None = None, user: str | None = None,
               where: Callable[[Request], bool] | None = None) -> list[Request]:
        """Requests since the mark by verb(s), resource, subresource (None: the object
        itself, "*": any), user and any other predicate."""
        wanted = {verbs} if isinstance(verbs, str) else set(verbs) if verbs else None
        return [r for r in self.requests()
                if (wanted is None or r.verb in wanted)
                and (resource is None or r.resource == resource)
                and (subresource == "*" or r.subresource == subresource)
                and (user is None or r.user == user)
                and (where is None or where(r))]

    def count(self, verbs: str | Iterable[str] | None = None, resource: str | None = None,
              **kwargs: Any) -> int:
        return len(self.select(verbs, resource, **kwargs))

    def barrier(self, timeout: float = 10.0) -> None:
        """Return once the server has logged every request answered before this call."""
        name = f"audit-barrier-{uuid.uuid4().hex[:12]}"
        start = self.path.stat().st_size if self.path.exists() else 0
        try:
            self.core.read_namespace(name)
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
        deadline = time.monotonic() + timeout
        while not self._logged(name, start):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the audit log {self.path} never showed {name}")
            time.sleep(0.05)

    def _logged(self, needle: str, start: int) -> bool:
        if not self.path.exists():
            return False
        with self.path.open("rb") as f:
            f.seek(start)
            return needle.encode() in f.read()
