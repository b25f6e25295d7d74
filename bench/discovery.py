"""Discovery time per domain and refresh behaviour, on the loopback DNS + HTTPS world.

100 domains publish MTA-STS (enforce).  Measured with the operator's
:class:`Discoverer` (the path ``mailtls discover`` takes):

- cold round: TXT + MX/TLSA lookups + address lookup + HTTPS fetch per domain,
  16 domains at a time (the default) and one at a time;
- warm round (cache valid, same id): DNS only, no fetch;
- id change of 10 domains: only those are refetched;
- a failed refresh (HTTP 500 after an id change) keeps the cached policy.

Baseline from the same run: a bare ``_mta-sts`` TXT lookup per domain (the least
any round must do).  Loopback only: real networks add their round-trip times.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from bench.common import Result, Summary, stats, table
from mailtls_operator.cli.discover import table_lines
from mailtls_operator.discovery.dns import Dns
from mailtls_operator.discovery.engine import Discoverer
from mailtls_operator.discovery.fetch import ssl_context
from testbed.stsworld import StsWorld

NAME = "discovery"
DOMAINS = [f"d{i:03d}.example" for i in range(100)]
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def run() -> Result:
    result = Result(NAME, "MTA-STS/DANE discovery per domain, cache and refresh (loopback)")
    with StsWorld([f"mta-sts.{d}" for d in DOMAINS]) as world:
        for d in DOMAINS:
            world.publish_sts(d, id="1", mx=[f"*.{d}"])
            world.publish_mx(d, f"mx.{d}")
        asyncio.run(_scenario(world, result))
    return result


async def _timed(coro: object) -> tuple[object, float]:
    start = time.perf_counter()
    value = await coro  # type: ignore[misc]
    return value, time.perf_counter() - start


async def _scenario(world: StsWorld, result: Result) -> None:
    def fresh() -> Discoverer:
        return Discoverer(Dns(("127.0.0.1", world.dns_port), timeout=5.0),
                          ssl_context(world.ca_file), https_port=world.https_port)

    n = len(DOMAINS)
    dns = Dns(("127.0.0.1", world.dns_port), timeout=5.0)
    txt = [(await _timed(dns.sts_txt(d)))[1] for d in DOMAINS]
    one = fresh()
    serial = [(await _timed(one.discover(d, NOW)))[1] for d in DOMAINS]
    par = fresh()
    states, cold = await _timed(par.discover_all(DOMAINS, NOW))
    assert len(table_lines(states, NOW)) == n  # type: ignore[arg-type]
    fetched_cold = par.fetches
    _, warm = await _timed(par.discover_all(DOMAINS, NOW + timedelta(hours=1)))
    fetched_warm = par.fetches - fetched_cold
    for d in DOMAINS[:10]:
        world.publish_sts(d, id="2", mx=[f"*.new.{d}"])
    _, changed = await _timed(par.discover_all(DOMAINS, NOW + timedelta(hours=2)))
    refetched = par.fetches - fetched_cold - fetched_warm
    world.publish_sts(DOMAINS[10], id="3")
    world.page(DOMAINS[10]).status = 500
    [kept] = await par.discover_all([DOMAINS[10]], NOW + timedelta(hours=3))
    kept_ok = kept.sts is not None and kept.sts.cached is not None and \
        kept.sts.cached.id == "1" and "HTTP 500" in kept.sts.error
    expired = await par.discover_all([DOMAINS[10]], NOW + timedelta(days=2))

    t, s = stats(txt), stats(serial)
    per_cold, per_warm = cold / n, warm / n
    result.config = {"domains": n, "parallel": 16}
    result.rows.append({"txt_lookup_s": t, "serial_discover_s": s, "cold_round_s": cold,
                        "warm_round_s": warm, "id_change_round_s": changed,
                        "fetches": {"cold": fetched_cold, "warm": fetched_warm,
                                    "after_10_id_changes": refetched},
                        "failed_refresh_kept_cache": kept_ok,
                        "expired_cache_undecided": not expired[0].decided})
    print(table(("per domain", "p50 s", "p95 s", "x TXT lookup p50"), [
        ("baseline: _mta-sts TXT lookup", t["p50"], t["p95"], "1x"),
        ("discover one domain (DANE+MTA-STS, cold)", s["p50"], s["p95"],
         f"{s['p50'] / t['p50']:.3g}x"),
        (f"cold round / {n} (16 parallel)", per_cold, "-", f"{per_cold / t['p50']:.3g}x"),
        (f"warm round / {n} (cache, no fetch)", per_warm, "-", f"{per_warm / t['p50']:.3g}x"),
    ]))
    print(f"fetches: cold {fetched_cold}, warm {fetched_warm}, after 10 id changes "
          f"{refetched}; failed refresh kept the cache: {kept_ok}; expired cache + failing "
          f"fetch -> undecided: {not expired[0].decided}")
    result.summary += [
        Summary(NAME, "discover one domain p50 (cold)", s["p50"], "s", t["p50"], "TXT lookup"),
        Summary(NAME, "cold round per domain (16 parallel)", per_cold, "s", t["p50"],
                "TXT lookup"),
        Summary(NAME, "warm round per domain (cached)", per_warm, "s", t["p50"], "TXT lookup"),
        Summary(NAME, "refetches after 10 id changes", refetched, "", 10, "changed ids",
                "= 10", refetched == 10),
        Summary(NAME, "fetches in a warm round", fetched_warm, "", None, "", "= 0",
                fetched_warm == 0),
    ]
