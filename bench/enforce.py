"""Apply-to-enforced latency: policy write -> every Postfix pod verified on the new
revision.

Three real local Postfix instances as kwok pods (exec strategy: every pod command an
exec through kube-apiserver's ``pods/exec``, one pod at a time, as the operator does by
default); 20 single-policy changes, each from a quiet operator. The clock starts when
the client's write returns and stops when the benchmark's watch receives the last pod's
``mailtls.io/applied-revision`` annotation for the new revision (the operator writes it
only after ``postmap -q`` proved the revision live in that pod); afterwards each pod's
live table is queried once more to confirm.

Every command the operator runs in a pod is timed (a wrapper around the runner), so each
change splits into: the Postfix commands (``postmap`` compile and queries, ``postfix
reload``, each with its exec round trip through kube-apiserver and kwok), the other pod
commands (stdin write, ``mv``), the debounce, and the operator's own overhead (the rest:
Kopf, rendering, API calls, scheduling). With the API emulation of earlier runs the
commands ran locally, without the exec round trip.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.common import Result, Summary, run_with_postfix, stats, table
from bench.harness import (
    API_SERVER_NOTE,
    Env,
    Pods,
    TimingRunner,
    bench_config,
    create_many,
    local_pods,
    operating,
    policy,
)
from mailtls_operator.render import REVISION_KEY, revision_value

NAME = "enforce_latency"
PODS = 3
CHANGES = 20
POLICIES = 50
DEBOUNCE = 0.05


def _spec(i: int, level: str) -> dict[str, Any]:
    return {"destinations": [f"d{i}.example", f".d{i}.example"], "level": level,
            "instances": ["relay"]}


def run() -> Result:
    return run_with_postfix(
        NAME, "Apply-to-enforced latency, 3 Postfix pods (exec through kube-apiserver)",
        _scenario)


async def _scenario(result: Result) -> None:
    config = bench_config(debounce=DEBOUNCE, max_delay=1.0)
    result.config = {"pods": PODS, "changes": CHANGES, "policies": POLICIES,
                     "debounce_s": DEBOUNCE, "parallelism": config.parallelism,
                     "map_type": "lmdb", "api_server": API_SERVER_NOTE}
    samples: list[dict[str, float]] = []
    with local_pods(PODS) as pods:
        def seed(env: Env) -> None:
            create_many(env.client, env.ns,
                        [policy(f"p{i:03d}", **_spec(i, "may")) for i in range(POLICIES)])

        async with operating(config, pods, seed=seed) as env:
            runner = env.runner
            await env.until(lambda: env.entries() == 2 * POLICIES
                            and env.pods_on(env.revision() or "", pods.names), 60)
            await env.settle()
            for n in range(CHANGES):
                level = "encrypt" if (n // POLICIES) % 2 == 0 else "may"  # always a change
                samples.append(await _change(env, pods, runner, n % POLICIES, level))
                await env.settle(quiet=0.05)

    keys = ("total", "postfix", "postmap", "reload", "other_cmds", "debounce", "operator")
    s = {k: stats([x[k] for x in samples]) for k in keys}
    result.rows.append({"stats": s, "samples": samples})
    labels = {
        "total": "write -> all 3 pods verified",
        "postfix": "  Postfix: postmap (compile+query) + reload, exec incl.",
        "postmap": "    of which postmap",
        "reload": "    of which postfix reload",
        "other_cmds": "  other pod commands (stdin write, mv)",
        "debounce": "  debounce (setting)",
        "operator": "  operator overhead (the rest)",
    }
    print(table((f"per change (n={len(samples)})", "p50 s", "p95 s", "max s",
                 "share of p50 total"),
                [(labels[k], s[k]["p50"], s[k]["p95"], s[k]["max"],
                  f"{s[k]['p50'] / s['total']['p50']:.0%}") for k in keys]))
    per_pod = stats([x["pod_commands"] / PODS for x in samples])
    print(f"pod commands per pod per rollout: {per_pod['p50']:.0f} (each one exec round trip "
          "through kube-apiserver and kwok's kubelet endpoint)")
    result.rows.append({"pod_commands_per_pod": per_pod})
    result.summary += [
        Summary(NAME, "write -> 3 pods enforced p50", s["total"]["p50"], "s",
                s["postfix"]["p50"], "postmap+reload"),
        Summary(NAME, "write -> 3 pods enforced p95", s["total"]["p95"], "s",
                s["postfix"]["p95"], "postmap+reload"),
        Summary(NAME, "operator overhead p50 (excl. debounce)", s["operator"]["p50"], "s",
                s["postfix"]["p50"], "postmap+reload"),
    ]
    result.notes.append("the 3 pods are rolled one after the other (parallelism 1), so the "
                        "Postfix time is the sum over the pods")
    result.notes.append("real server: every pod command is an exec through kube-apiserver "
                        "(websocket v5 -> SPDY -> kwok -> local Postfix); the emulation's "
                        "runs ran them locally, so totals and 'postmap+reload' now include "
                        "the exec round trips")


async def _change(env: Env, pods: Pods, runner: TimingRunner, i: int,
                  level: str) -> dict[str, float]:
    old = env.revision()
    seen = len(env.commits)
    returned = await asyncio.to_thread(env.replace_spec_sync, env.ns, f"p{i:03d}",
                                       _spec(i, level))

    def new_revision() -> str | None:
        for c in env.commits[seen:]:
            rev = (c.obj["metadata"].get("annotations") or {}).get("mailtls.io/revision")
            if c.resource == "configmaps" and rev not in (None, old):
                return str(rev)
        return None

    revision: str = await env.until(new_revision, 30)

    def all_verified() -> float | None:
        done: dict[str, float] = {}
        for c in env.commits[seen:]:
            ann = c.obj["metadata"].get("annotations") or {}
            if c.resource == "pods" and ann.get("mailtls.io/applied-revision") == revision:
                done.setdefault(c.name, c.at)
        return max(done.values()) if len(done) == len(pods.names) else None

    end: float = await env.until(all_verified, 60)
    want = revision_value(revision)
    for name, inst in pods.instances.items():  # the live tables really are the new revision
        live = await asyncio.to_thread(inst.query, REVISION_KEY)
        if live != want:
            raise RuntimeError(f"{name}: live revision {live!r}, expected {want!r}")
    spans = [sp for sp in runner.between(returned, end) if sp.rollout]
    postmap = sum(sp.seconds for sp in spans if sp.kind in ("postmap", "query"))
    reload = sum(sp.seconds for sp in spans if sp.kind == "reload")
    cmds = sum(sp.seconds for sp in spans)
    others = [sp for sp in runner.between(returned, end) if not sp.rollout]
    total = end - returned
    return {"total": total, "postmap": postmap, "reload": reload,
            "postfix": postmap + reload, "other_cmds": cmds - postmap - reload,
            "debounce": DEBOUNCE, "operator": total - cmds - DEBOUNCE,
            "pod_commands": float(len(spans)), "other_pod_commands": float(len(others))}
