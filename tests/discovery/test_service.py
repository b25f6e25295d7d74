"""DiscoveryService with its seams injected: status writes, Events, entries, deletion."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry

from mailtls_operator.discovery.engine import Discoverer
from mailtls_operator.discovery.report import cached_from_status
from mailtls_operator.discovery.service import DiscoveryService
from testbed.stsworld import StsWorld

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _obj(*domains: str, generation: int = 1, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSDiscovery",
            "metadata": {"name": "partners", "namespace": "mail", "uid": "u1",
                         "generation": generation},
            "spec": {"domains": list(domains), **spec}}


class Recorder:
    def __init__(self) -> None:
        self.statuses: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str, str]] = []
        self.woken: list[str] = []

    async def write_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        self.statuses.append(status)

    async def post_event(self, involved: dict[str, Any], kind: str, reason: str,
                         message: str) -> None:
        self.events.append((involved["kind"], kind, reason, message))


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_rounds_status_events_and_deletion(world: StsWorld,
                                                 discoverer: Discoverer) -> None:
    world.publish_sts("partner.example", id="1", mx=["*.partner.example"])
    rec = Recorder()
    registry = CollectorRegistry()
    service = DiscoveryService(wake=rec.woken.append, write_status=rec.write_status,
                               post_event=rec.post_event, clock=lambda: NOW,
                               registry=registry, discoverer=discoverer)
    try:
        service.on_object("ADDED", _obj("partner.example", "gone.example"))
        await _until(lambda: rec.statuses)
        status = rec.statuses[-1]
        assert status["observedGeneration"] == 1 and status["enforced"] == 1
        assert status["conditions"][0]["reason"] == "Discovered"
        assert [d["domain"] for d in status["domains"]] == ["partner.example", "gone.example"]
        assert rec.woken == ["mail"]
        [entry] = service.entries_for(("mail", "relay"))
        assert (entry.ref, entry.value) == ("mail/partners[mta-sts]",
                                            "secure match=.partner.example servername=hostname")
        assert service.entries_for(("other", "relay")) == []
        assert rec.events == []  # the first sight is not a change

        world.publish_sts("partner.example", id="2", mx=["*.mx.partner.example"])
        service.on_object("MODIFIED", _obj("partner.example", generation=2))
        await _until(lambda: rec.events)
        assert rec.events == [("MailTLSDiscovery", "Normal", "PolicyChanged",
                               "partner.example: id 1 -> 2; mx ['*.partner.example'] -> "
                               "['*.mx.partner.example']")]

        world.publish_sts("partner.example", id="3", mode="testing", mx=["*.mx.partner.example"])
        service.on_object("MODIFIED", _obj("partner.example", generation=3,
                                           checkIntervalSeconds=120))  # a new round
        await _until(lambda: len(rec.events) == 2)
        assert rec.events[1] == ("MailTLSDiscovery", "Warning", "PolicyChanged",
                                 "partner.example: id 2 -> 3; mode enforce -> testing; "
                                 "its line is no longer written")
        assert registry.get_sample_value("mailtls_discovered_policy_changes_total", {
            "namespace": "mail", "discovery": "partners", "field": "mx"}) == 1.0

        writes = len(rec.statuses)
        service.on_object("MODIFIED", _obj("[not.a.domain]", generation=4))  # refused
        await _until(lambda: len(rec.statuses) > writes)
        assert rec.statuses[-1]["conditions"][0]["reason"] == "Invalid"
        assert service.entries_for(("mail", "relay"))  # the last good object still counts

        service.on_object("DELETED", _obj("partner.example"))
        assert service.entries_for(("mail", "relay")) == []
    finally:
        await service.stop()


async def test_a_new_operator_keeps_the_recorded_policy_when_the_refresh_fails(
        world: StsWorld, discoverer: Discoverer) -> None:
    """Restart or leader change: the cache comes back from the status (RFC 8461 §5.1)."""
    world.publish_sts("partner.example", id="2", mx=["*.new.partner.example"])
    world.page("partner.example").status = 500  # the refresh fails
    recorded = {"domain": "partner.example", "source": "mta-sts", "mode": "enforce",
                "mx": ["*.partner.example"], "id": "1", "fetchedAt": "2026-12-01T11:00:00Z",
                "expiresAt": "2026-12-02T11:00:00Z"}
    rec = Recorder()
    service = DiscoveryService(wake=rec.woken.append, write_status=rec.write_status,
                               post_event=rec.post_event, clock=lambda: NOW,
                               registry=CollectorRegistry(), discoverer=discoverer)
    try:
        service.on_object("ADDED", {**_obj("partner.example"),
                                    "status": {"domains": [recorded]}})
        await _until(lambda: rec.statuses)
        [entry] = service.entries_for(("mail", "relay"))
        assert entry.value == "secure match=.partner.example servername=hostname"
        [domain] = rec.statuses[-1]["domains"]
        assert domain["id"] == "1" and "HTTP 500" in domain["lastError"]
        assert rec.events == []  # nothing changed
    finally:
        await service.stop()
    forged = {**recorded, "mx": ["evil example"]}  # status is checked like partner input
    assert cached_from_status(forged) is None
    assert cached_from_status({**recorded, "mode": "dane-only"}) is None
