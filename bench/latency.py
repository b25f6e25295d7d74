"""Policy write -> ConfigMap write latency through the real kube-apiserver (no pods).

100 policies target instance ``relay``; 100 single-policy changes are made one after the
other (each flips one policy's level, so each changes the table). Latency: from the
moment the client's write returned (taken in the client's thread) to the moment the
benchmark's own watch received the ConfigMap with the new revision (a few ms after
kube-apiserver stored it; the API emulation of earlier runs stamped the commit inside
the server). The operator's debounce is set low (0.05 s) and reported next to the
figure, with the API write round trip of the same run as a second baseline. Each change
starts from a quiet operator (statuses written).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.common import Result, Summary, stats, table
from bench.harness import API_SERVER_NOTE, Env, bench_config, create_many, operating, policy

NAME = "configmap_latency"
CHANGES = 100
POLICIES = 100
DEBOUNCE = 0.05


def _spec(i: int, level: str) -> dict[str, Any]:
    return {"destinations": [f"d{i}.example", f".d{i}.example"], "level": level,
            "instances": ["relay"]}


def run() -> Result:
    result = Result(NAME, "Policy write -> ConfigMap write latency (kube-apiserver, no pods)")
    asyncio.run(_scenario(result))
    return result


async def _scenario(result: Result) -> None:
    config = bench_config(debounce=DEBOUNCE, max_delay=1.0)
    result.config = {"changes": CHANGES, "policies": POLICIES, "debounce_s": config.debounce,
                     "max_delay_s": config.max_delay, "api_server": API_SERVER_NOTE}

    def seed(env: Env) -> None:
        create_many(env.client, env.ns,
                    [policy(f"p{i:03d}", **_spec(i, "may")) for i in range(POLICIES)])

    latencies: list[float] = []
    writes: list[float] = []
    async with operating(config, seed=seed) as env:
        await env.until(lambda: env.entries() == 2 * POLICIES)
        await env.settle()
        for n in range(CHANGES):
            i = n % POLICIES
            level = "encrypt" if (n // POLICIES) % 2 == 0 else "may"
            lat, rtt = await _change(env, i, level)
            latencies.append(lat)
            writes.append(rtt)
            await env.settle(quiet=0.05)
    s, w = stats(latencies), stats(writes)
    result.rows.append({"latency_s": s, "api_write_s": w, "debounce_s": DEBOUNCE,
                        "samples": latencies})
    print(table(("policy write -> ConfigMap stored", "p50 s", "p95 s", "min s", "max s",
                 "p50 / debounce"),
                [(f"latency (n={s['n']})", s["p50"], s["p95"], s["min"], s["max"],
                  f"{s['p50'] / DEBOUNCE:.3g}x"),
                 ("baseline: operator debounce setting", DEBOUNCE, DEBOUNCE, "-", "-", "1x"),
                 ("baseline: API write round trip", w["p50"], w["p95"], w["min"], w["max"],
                  f"{w['p50'] / DEBOUNCE:.3g}x")]))
    over = s["p50"] - DEBOUNCE
    print(f"operator overhead above the debounce: p50 {over * 1000:.1f} ms, "
          f"p95 {(s['p95'] - DEBOUNCE) * 1000:.1f} ms")
    result.summary += [
        Summary(NAME, "write -> ConfigMap p50", s["p50"], "s", DEBOUNCE, "debounce"),
        Summary(NAME, "write -> ConfigMap p95", s["p95"], "s", DEBOUNCE, "debounce"),
    ]


async def _change(env: Env, i: int, level: str) -> tuple[float, float]:
    """One change; (latency to the stored ConfigMap, API write round trip)."""
    old = env.revision()
    seen = len(env.commits)
    sent = time.perf_counter()
    returned = await asyncio.to_thread(env.replace_spec_sync, env.ns, f"p{i:03d}",
                                       _spec(i, level))

    def stored() -> float | None:
        for c in env.commits[seen:]:
            if c.resource == "configmaps" and \
                    (c.obj["metadata"].get("annotations") or {}).get("mailtls.io/revision") \
                    not in (None, old):
                return c.at
        return None

    at = await env.until(stored, 30)
    if at < returned:
        raise RuntimeError("the ConfigMap was stored before the client's write returned: "
                           "raise the debounce of this benchmark")
    return at - returned, returned - sent
