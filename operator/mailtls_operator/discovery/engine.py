"""One discovery round: ask DNS and HTTPS, let the pure core decide, keep the cache.

The operator keeps one :class:`Discoverer` (its cache survives rounds, so an
unexpired policy outlives a failed refresh); ``mailtls discover`` makes a
fresh one per run.  Both call :meth:`Discoverer.discover_all`, so the CLI
prints what the operator would write.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from .decide import (
    DANE,
    FETCH,
    MTA_STS,
    SOURCES,
    CachedSts,
    DomainState,
    StsOutcome,
    dane_decide,
    sts_after,
    sts_plan,
)
from .dns import Dns, parse_nameserver
from .entries import domain_keys
from .fetch import FetchError, fetch_policy, ssl_context
from .mtasts import StsPolicy

DEFAULT_PARALLEL = 16


@dataclass
class Discoverer:
    """DNS, TLS settings and the MTA-STS cache (domain -> fetched policy)."""

    dns: Dns
    tls: ssl.SSLContext
    https_port: int | None = None
    """Only the test world changes it; production always connects to 443."""
    cache: dict[str, CachedSts] = field(default_factory=dict)
    fetches: int = 0
    """Policy fetches made (refresh behaviour is observable, not guessed)."""

    async def _sts(self, domain: str, now: datetime) -> StsOutcome:
        cached = self.cache.get(domain)
        txt = await self.dns.sts_txt(domain)
        plan = sts_plan(cached, txt, now)
        fetched: StsPolicy | None = None
        error = ""
        if plan == FETCH:
            self.fetches += 1
            try:
                fetched = await fetch_policy(domain, self.dns, self.tls, port=self.https_port)
            except FetchError as exc:
                error = str(exc)
        outcome = sts_after(cached, txt, plan, now, fetched, error)
        if outcome.cached is not None:
            self.cache[domain] = outcome.cached
        else:
            self.cache.pop(domain, None)
        return outcome

    async def discover(self, domain: str, now: datetime,
                       sources: Iterable[str] = SOURCES) -> DomainState:
        """The state of one domain (A-label used on the wire) after this round."""
        wanted = tuple(s for s in SOURCES if s in set(sources))
        name = domain_keys(domain)[0]
        dane = dane_decide(await self.dns.dane(name)) if DANE in wanted else None
        sts = await self._sts(name, now) if MTA_STS in wanted else None
        return DomainState(domain, wanted, dane=dane, sts=sts)

    async def discover_all(self, domains: Iterable[str], now: datetime,
                           sources: Iterable[str] = SOURCES,
                           parallel: int = DEFAULT_PARALLEL) -> list[DomainState]:
        """Every domain, at most ``parallel`` at once, results in input order."""
        gate = asyncio.Semaphore(parallel)
        wanted = tuple(sources)

        async def one(domain: str) -> DomainState:
            async with gate:
                return await self.discover(domain, now, wanted)

        return list(await asyncio.gather(*(one(d) for d in domains)))


def build_discoverer(nameserver: str | None, ca_file: str | None,
                     timeout: float = 5.0) -> Discoverer:
    """A :class:`Discoverer` from ``HOST[:PORT]`` and a CA file (None: the system's).

    Raises :class:`ValueError` (bad nameserver) or :class:`OSError` (unreadable CA file)
    with a message for people; the CLI and ``mailtls run`` share it.
    """
    server = parse_nameserver(nameserver) if nameserver else None
    return Discoverer(Dns(server, timeout=timeout), ssl_context(ca_file))
