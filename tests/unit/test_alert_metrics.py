"""The series the chart's alerts read: one per break-glass exception in force (its
window), one per discovery object (failing domains, earliest cache expiry), the leader
flag; none for ordinary policies, and each removed when its object is gone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from mailtls_operator.controller.statuses import Statuses
from mailtls_operator.discovery.service import DiscoveryService
from mailtls_operator.metrics import Metrics
from mailtls_operator.world import World

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def _series(metrics: Metrics, name: str) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels.values()): s.value for m in metrics.registry.collect()
            for s in m.samples if s.name == name}


def _policy(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "mail", "uid": f"uid-{name}",
                         "generation": 1, "creationTimestamp": "2026-05-01T00:00:00Z"},
            "spec": {"destinations": [f"{name}.example"], "level": "may", **spec}}


class _Ctx:
    def __init__(self) -> None:
        self.metrics = Metrics()
        self.world = World(clock=lambda: NOW)


def test_each_exception_in_force_has_its_window_and_ordinary_policies_none() -> None:
    ctx = _Ctx()
    statuses = Statuses.__new__(Statuses)
    statuses.ctx = ctx  # type: ignore[assignment]
    statuses._excepted = {}
    expires = NOW + timedelta(days=2)
    ctx.world.upsert_policy(_policy("plain"))
    ctx.world.upsert_policy(_policy("broken-partner", exception={
        "startsAt": "2026-05-31T00:00:00Z", "expiresAt": expires.isoformat().replace("+00:00", "Z"),
        "reason": "partner certificate expired"}))
    statuses._gauge_exceptions("mail", NOW)
    expiry = _series(ctx.metrics, "mailtls_exception_expiry_timestamp_seconds")
    assert expiry == {("mail", "broken-partner"): expires.timestamp()}
    start = _series(ctx.metrics, "mailtls_exception_start_timestamp_seconds")
    assert start == {("mail", "broken-partner"): datetime(2026, 5, 31, tzinfo=UTC).timestamp()}
    assert _series(ctx.metrics, "mailtls_exceptions_active") == {("mail",): 1.0}
    statuses._gauge_exceptions("mail", expires + timedelta(seconds=1))  # expired
    assert _series(ctx.metrics, "mailtls_exception_expiry_timestamp_seconds") == {}
    assert _series(ctx.metrics, "mailtls_exception_start_timestamp_seconds") == {}
    assert _series(ctx.metrics, "mailtls_exceptions_active") == {("mail",): 0.0}


def test_discovery_series_are_per_object_and_leave_with_it() -> None:
    metrics = Metrics()

    async def _noop(*_: Any) -> None:
        return None

    service = DiscoveryService(wake=lambda _ns: None, write_status=_noop, post_event=_noop,
                               clock=lambda: NOW, registry=metrics.registry)
    key = ("mail", "partners")
    domains = [
        {"domain": "a.example", "source": "mta-sts", "mode": "enforce", "lastError": "",
         "expiresAt": "2026-06-10T00:00:00Z", "entry": "a.example secure"},
        {"domain": "b.example", "source": "mta-sts", "mode": "enforce",
         "lastError": "fetch failed", "expiresAt": "2026-06-02T00:00:00Z",
         "entry": "b.example secure"},
        {"domain": "c.example", "source": "", "mode": "", "lastError": "TXT lookup failed",
         "expiresAt": ""},
    ]
    service._summary(key, domains)
    assert _series(metrics, "mailtls_discovery_failing_domains") == {key: 2.0}
    assert _series(metrics, "mailtls_discovery_cache_expiry_timestamp_seconds") == {
        key: datetime(2026, 6, 2, tzinfo=UTC).timestamp()}
    service._summary(key, domains[2:])  # no cached policy left
    assert _series(metrics, "mailtls_discovery_cache_expiry_timestamp_seconds") == {}
    service.on_object("DELETED", {"metadata": {"namespace": "mail", "name": "partners"}})
    assert _series(metrics, "mailtls_discovery_failing_domains") == {}
    assert _series(metrics, "mailtls_discovered_domains") == {}


def test_the_leader_flag_follows_leadership() -> None:
    from types import SimpleNamespace

    from mailtls_operator.controller import Config, Operator
    from mailtls_operator.kube import Kube

    metrics = Metrics()
    leader = SimpleNamespace(is_leader=False)
    op = Operator(Kube.__new__(Kube), None, Config(), metrics=metrics,  # type: ignore[arg-type]
                  leader=leader)  # type: ignore[arg-type]
    assert _series(metrics, "mailtls_leader") == {(): 0.0}
    leader.is_leader = True
    assert _series(metrics, "mailtls_leader") == {(): 1.0}
    op.leader = None  # without leader election every process writes
    assert _series(metrics, "mailtls_leader") == {(): 1.0}
