"""Leader election on a ``coordination.k8s.io/v1`` Lease, so two replicas never roll out at once.

Kopf's peering pauses *every* operator of equal priority when it sees another, so replicas
of one Deployment would all stand still; a Lease gives one active replica and hot
standbys, the way client-go's leaderelection does: the holder renews ``renewTime`` every
``renew_every`` seconds; another replica takes the Lease over only once it has not been
renewed for ``lease_seconds``, with the Lease's resourceVersion as precondition (a 409 means
someone else won).  Every replica keeps watching (its world index stays warm); only the
leader converges, so a takeover resumes within one lease period.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from .kube import Conflict, Kube, NotFound

log = logging.getLogger("mailtls.leader")


def _stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class LeaderElector:
    """Hold (or wait for) the Lease ``namespace/name`` as ``identity``."""

    def __init__(self, kube: Kube, namespace: str, name: str, identity: str, *,
                 lease_seconds: float = 15.0, renew_every: float = 5.0,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        if renew_every >= lease_seconds:
            raise ValueError("renew_every must be shorter than lease_seconds")
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.renew_every = renew_every
        self.clock = clock
        self.leading = asyncio.Event()
        self._last_renew: datetime | None = None

    @property
    def is_leader(self) -> bool:
        return self.leading.is_set()

    def _spec(self, now: datetime, transitions: int, acquired: str | None) -> dict[str, Any]:
        return {"holderIdentity": self.identity,
                "leaseDurationSeconds": int(self.lease_seconds),
                "acquireTime": acquired or _stamp(now), "renewTime": _stamp(now),
                "leaseTransitions": transitions}

    async def try_acquire_or_renew(self) -> bool:
        """One round: True if we hold the Lease afterwards."""
        now = self.clock()
        try:
            lease = await self.kube.get_lease(self.namespace, self.name)
        except NotFound:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(now, 0, None)}
            try:
                await self.kube.create_lease(body)
            except Conflict:
                return False
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        renewed = _parse(spec.get("renewTime")) or datetime.min.replace(tzinfo=UTC)
        duration = timedelta(seconds=float(spec.get("leaseDurationSeconds")
                                           or self.lease_seconds))
        if holder not in (None, "", self.identity) and renewed + duration > now:
            return False  # someone else holds a live lease
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder != self.identity:
            transitions += 1
        acquired = spec.get("acquireTime") if holder == self.identity else None
        patch = {"metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                 "spec": self._spec(now, transitions, acquired)}
        try:
            await self.kube.patch_lease(self.namespace, self.name, patch)
        except (Conflict, NotFound):
            return False
        return True

    async def run(self, on_change: Callable[[bool], None]) -> None:
        """Forever: acquire, renew, or wait; call ``on_change(leading)`` on every change."""
        while True:
            try:
                held = await self.try_acquire_or_renew()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API is down: keep leading only while the lease is
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
                last = self._last_renew
                held = self.is_leader and last is not None and \
                    (self.clock() - last).total_seconds() < self.lease_seconds - self.renew_every
            if held:
                self._last_renew = self.clock()
            if held != self.is_leader:
                if held:
                    self.leading.set()
                    log.info("leading as %s (lease %s/%s)", self.identity, self.namespace,
                             self.name)
                else:
                    self.leading.clear()
                    log.warning("lost the lease %s/%s: standing by", self.namespace, self.name)
                on_change(held)
            await asyncio.sleep(self.renew_every if held else self.renew_every / 2)

    async def release(self) -> None:
        """On a clean shutdown: hand the Lease over at once instead of after a lease period."""
        if not self.is_leader:
            return
        self.leading.clear()
        try:
            lease = await self.kube.get_lease(self.namespace, self.name)
            if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                await self.kube.patch_lease(self.namespace, self.name, {
                    "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                    "spec": {"holderIdentity": None, "renewTime": None}})
        except Exception as exc:
            log.warning("could not release the lease: %s", exc)
