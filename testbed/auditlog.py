"""kube-apiserver's audit log read as it grows: who made which request, counted by the server.

The benchmarks and the demo count the operator's API requests here rather than in an
emulation's counter. :class:`ControlPlane` logs every request at level ``Metadata`` as one
JSON line per stage; a watch is logged when its response starts and again when it ends,
every other request once, complete. Requests are keyed by ``auditID`` (a watch counts
once, where it started); :meth:`AuditTail.barrier` waits until the server has logged
everything answered before it.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

WRITES = frozenset({"create", "update", "patch", "delete"})


@dataclass(frozen=True, slots=True)
class Request:
    """One API request as the server audited it."""

    verb: str
    resource: str
    subresource: str
    namespace: str
    name: str
    user: str
    at: float
    """When the server finished it (``stageTimestamp``), seconds since the epoch."""
    code: int | None = None
    """The response's HTTP status code."""
    uri: str = ""
    """The request URI with its query."""
    user_agent: str = ""

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.uri).query)

    def param(self, key: str) -> str | None:
        """One query parameter (its first value), None if absent."""
        values = self.query.get(key)
        return values[0] if values else None

    @property
    def label_selector(self) -> str | None:
        return self.param("labelSelector")

    @property
    def limit(self) -> int | None:
        text = self.param("limit")
        return int(text) if text is not None else None

    @property
    def kind(self) -> str:
        """``verb resource[/subresource]``, as the benchmarks tabulate requests."""
        sub = f"/{self.subresource}" if self.subresource else ""
        return f"{self.verb} {self.resource}{sub}"


def _stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else 0.0


def _request(event: dict[str, Any]) -> Request:
    ref = event.get("objectRef") or {}
    return Request(verb=event.get("verb", ""), resource=ref.get("resource", ""),
                   subresource=ref.get("subresource", ""), namespace=ref.get("namespace", ""),
                   name=ref.get("name", ""),
                   user=(event.get("user") or {}).get("username", ""),
                   at=_stamp(event.get("stageTimestamp", "")),
                   code=(event.get("responseStatus") or {}).get("code"),
                   uri=event.get("requestURI", ""), user_agent=event.get("userAgent", ""))


class AuditTail:
    """The audit log from the moment this object was made, read on :meth:`poll`.

    ``probe(path)`` makes one GET request to the server (a 404 is fine): the barrier's
    needle."""

    def __init__(self, path: Path, probe: Callable[[str], Any]) -> None:
        self.path = path
        self.probe = probe
        self.log: list[Request] = []
        self._index: dict[str, int] = {}
        self._offset = path.stat().st_size if path.exists() else 0

    def poll(self) -> int:
        """Read what the server logged since the last poll; returns the requests so far."""
        if not self.path.exists():
            return len(self.log)
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self._offset += end
        for raw in data[:end].splitlines():
            event = json.loads(raw)
            key = event["auditID"]
            request = _request(event)
            if key in self._index:
                if request.verb != "watch":  # a watch stays where it started
                    self.log[self._index[key]] = request
            else:
                self._index[key] = len(self.log)
                self.log.append(request)
        return len(self.log)

    def barrier(self, timeout: float = 10.0) -> int:
        """Return (the number of requests logged) once every request answered before this
        call is in the log and read."""
        needle = f"audit-barrier-{uuid.uuid4().hex[:12]}"
        start = self.poll()
        with contextlib.suppress(Exception):  # a 404 is the expected answer
            self.probe(f"/api/v1/namespaces/{needle}")
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if any(r.name == needle for r in self.log[start:]):
                return len(self.log)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the audit log {self.path} never showed {needle}")
            time.sleep(0.02)

    def select(self, verbs: str | Iterable[str] | None = None, resource: str | None = None, *,
               subresource: str | None = "", user: str | None = None,
               since: int = 0, where: Callable[[Request], bool] | None = None) -> list[Request]:
        """Requests from index ``since`` on, by verb(s), resource, subresource ("": the object
        itself, None: any), user and any other predicate."""
        wanted = {verbs} if isinstance(verbs, str) else set(verbs) if verbs else None
        return [r for r in self.log[since:]
                if (wanted is None or r.verb in wanted)
                and (resource is None or r.resource == resource)
                and (subresource is None or r.subresource == subresource)
                and (user is None or r.user == user)
                and (where is None or where(r))]

    def count(self, verbs: str | Iterable[str] | None = None, resource: str | None = None,
              **kwargs: Any) -> int:
        return len(self.select(verbs, resource, **kwargs))

    def by_kind(self, *, user: str | None = None, since: int = 0) -> dict[str, int]:
        """Requests since ``since`` by ``verb resource[/subresource]``."""
        kinds: dict[str, int] = {}
        for r in self.log[since:]:
            if user is None or r.user == user:
                kinds[r.kind] = kinds.get(r.kind, 0) + 1
        return kinds
