"""ConfigMap change -> 3 pods verified: the agent strategy against exec, same run.

Three real local Postfix pods, 50 policies, 10 single-policy changes per mode.
The clock starts when the API server stores the ConfigMap with the new revision
and stops when it stores the last pod's ``mailtls.io/applied-revision`` for it
(both taken in the server as it commits).  Modes:

- ``exec`` (default parallelism 1, one pod after the other) and ``exec x3``
  (parallelism 3): the operator runs the commands through the pod runner; every
  command is one exec request of the API in production;
- ``agent``: three real ``mailtls agent`` processes (``python -m
  mailtls_operator.cli agent``), one per pod, watching the ConfigMap through the
  emulation and patching their pods' annotations; the operator runs nothing in pods.

API requests per rollout per pod: exec = pod commands (exec requests) + annotation
patches; agent = the agents' requests (patches, ConfigMap GETs; their open watch
delivers the change without a request).  Agent RSS: each agent process after the
changes (VmRSS and peak VmHWM), against the operator process (this one) as a baseline.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

from bench.common import Result, Summary, hwm_mib, rss_mib, run_with_postfix, stats, table
from bench.harness import NAMESPACE, Env, Pods, TimingRunner, bench_config, emulation, local_pods
from bench.harness import policy as policy_object

NAME = "agent_rollout"
PODS = 3
CHANGES = 10
POLICIES = 50
DEBOUNCE = 0.05


def _spec(i: int, level: str) -> dict[str, Any]:
    return {"destinations": [f"d{i}.example"], "level": level, "instances": ["relay"]}


def run() -> Result:
    return run_with_postfix(NAME, "ConfigMap change -> 3 pods verified: agent vs exec",
                            _scenario)


def _agent_cmd(url: str, name: str, pods: Pods) -> list[str]:
    inst = pods.instances[name]
    return [sys.executable, "-m", "mailtls_operator.cli", "agent", "--api-url", url,
            "--instance", "relay", "--namespace", NAMESPACE, "--pod", name,
            "--map-path", str(inst.map_path), "--map-type", inst.settings.map_type,
            "--configmap-dir", str(inst.configmap_dir), "--observe-interval", "0",
            "--probe-interval", "0", "--log-level", "WARNING"]


async def _mode(mode: str, result: Result) -> dict[str, Any]:
    parallelism = 3 if mode == "exec x3" else 1
    config = bench_config(debounce=DEBOUNCE, max_delay=1.0, parallelism=parallelism,
                          default_strategy="agent" if mode == "agent" else "exec")
    with local_pods(PODS) as pods:
        runner = TimingRunner(pods.runner)

        def seed(server: Any) -> None:
            pods.seed(server)
            for i in range(POLICIES):
                server.seed("mailtlspolicies", policy_object(f"p{i:03d}", **_spec(i, "may")))

        async with emulation(config, runner, seed=seed) as env:
            procs: list[subprocess.Popen[bytes]] = []
            try:
                if mode == "agent":
                    url = str(env.server.url).rstrip("/")
                    for name in pods.names:
                        inst = pods.instances[name]
                        procs.append(subprocess.Popen(
                            _agent_cmd(url, name, pods), env={**os.environ, **inst.env,
                                                              "PATH": inst.env["PATH"] + ":"
                                                              + os.environ.get("PATH", "")},
                            stdin=subprocess.DEVNULL))
                await env.until(lambda: env.entries() == POLICIES
                                and env.pods_on(env.revision() or "", pods.names), 60)
                await env.settle(quiet=0.5)
                latencies, requests = [], []
                for n in range(CHANGES):
                    level = "encrypt" if (n // POLICIES) % 2 == 0 else "may"  # a change
                    lat, req = await _change(env, pods, runner, n % POLICIES, level)
                    latencies.append(lat)
                    requests.append(req)
                rss = [rss_mib(p.pid) for p in procs]
                hwm = [hwm_mib(p.pid) for p in procs]
            finally:
                for p in procs:
                    p.terminate()
                for p in procs:
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait(5)
    return {"mode": mode, "latency": stats(latencies), "samples": latencies,
            "requests_per_pod": sum(requests) / len(requests) / PODS,
            "agent_rss_mib": rss, "agent_hwm_mib": hwm}


async def _change(env: Env, pods: Pods, runner: TimingRunner, i: int,
                  level: str) -> tuple[float, int]:
    """One change; (ConfigMap stored -> last pod verified, API requests of the rollout)."""
    old = env.revision()
    seen = len(env.server.commits)
    spans = len(runner.spans)
    patches = env.server.request_count("patch", "pods")
    gets = env.server.request_count("get", "configmaps")
    await asyncio.to_thread(env.replace_spec_sync, NAMESPACE, f"p{i:03d}", _spec(i, level))

    def stored() -> tuple[str, float] | None:
        for c in env.server.commits[seen:]:
            rev = (c.obj["metadata"].get("annotations") or {}).get("mailtls.io/revision")
            if c.resource == "configmaps" and rev not in (None, old):
                return rev, c.at
        return None

    revision, start = await env.until(stored, 30)

    def verified() -> float | None:
        done: dict[str, float] = {}
        for c in env.server.commits[seen:]:
            ann = c.obj["metadata"].get("annotations") or {}
            if c.resource == "pods" and ann.get("mailtls.io/applied-revision") == revision:
                done.setdefault(c.name, c.at)
        return max(done.values()) if len(done) == PODS else None

    end = await env.until(verified, 30)
    await env.settle(quiet=0.3)  # the agents' second report (queue, routing) counts too
    requests = (len(runner.spans) - spans) + (env.server.request_count("patch", "pods")
                                              - patches) \
        + (env.server.request_count("get", "configmaps") - gets)
    return end - start, requests


async def _scenario(result: Result) -> None:
    result.config = {"pods": PODS, "changes": CHANGES, "policies": POLICIES,
                     "debounce_s": DEBOUNCE, "map_type": "lmdb"}
    rows = [await _mode(mode, result) for mode in ("exec", "exec x3", "agent")]
    result.rows.extend(rows)
    by = {r["mode"]: r for r in rows}
    print(table(("ConfigMap stored -> 3 pods verified", "p50 s", "p95 s", "min s", "max s",
                 "API requests / rollout / pod"),
                [(f"{r['mode']} (n={r['latency']['n']})", r["latency"]["p50"],
                  r["latency"]["p95"], r["latency"]["min"], r["latency"]["max"],
                  f"{r['requests_per_pod']:.1f}") for r in rows]))
    agent = by["agent"]
    operator_rss = rss_mib()
    print(table(("process", "RSS MiB", "peak MiB"),
                [(f"agent {i}", rss, hwm) for i, (rss, hwm) in
                 enumerate(zip(agent["agent_rss_mib"], agent["agent_hwm_mib"], strict=True))]
                + [("baseline: this benchmark process (operator + emulation)", operator_rss,
                    hwm_mib())]))
    result.notes.append("exec requests count one API request per pod command (the exec "
                        "websocket upgrade); the agents' long-lived watch is not counted")
    p50 = {m: by[m]["latency"]["p50"] for m in by}
    max_rss = max(agent["agent_rss_mib"]) if agent["agent_rss_mib"] else None
    result.summary += [
        Summary(NAME, "agent: ConfigMap -> 3 pods verified p50", p50["agent"], "s",
                p50["exec"], "exec p50", "agent <= exec, < 0.5 s",
                p50["agent"] <= p50["exec"] and p50["agent"] < 0.5),
        Summary(NAME, "exec x3: ConfigMap -> 3 pods verified p50", p50["exec x3"], "s",
                p50["exec"], "exec p50"),
        Summary(NAME, "agent RSS (max of 3)", max_rss, "MiB", round(operator_rss, 1),
                "operator process", "< 40 MiB", max_rss is not None and max_rss < 40),
        Summary(NAME, "agent: API requests / rollout / pod", by["agent"]["requests_per_pod"],
                "", by["exec"]["requests_per_pod"], "exec"),
    ]

