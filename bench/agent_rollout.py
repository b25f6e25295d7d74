"""ConfigMap change -> 3 pods verified: the agent strategy against exec, same run.

Three real local Postfix instances as kwok pods on the real kube-apiserver, 50 policies,
10 single-policy changes per mode.  Two clocks, both ending when the benchmark's watch
receives the last pod's ``mailtls.io/applied-revision`` for the new revision: one starts
when the watch receives the ConfigMap with that revision (ConfigMap -> 3 pods
verified), the other when the client's policy write returned (apply -> 3 pods
enforced, the whole path a user sees).  Modes:

- ``exec`` (default parallelism 1, one pod after the other) and ``exec x3``
  (parallelism 3): the operator runs every command as an exec through
  kube-apiserver's ``pods/exec`` (websocket v5, translated to SPDY towards kwok's
  kubelet endpoint, run locally against the pod's Postfix);
- ``agent``: three real ``mailtls agent`` processes (``python -m
  mailtls_operator.cli agent``), one per pod, watching the ConfigMap through
  kube-apiserver and patching their pods' annotations, each with a pod's in-cluster
  credentials (a ServiceAccount token and the CA at the kubelet's path, in a mount
  namespace of its own); the operator runs nothing in pods.

API requests per rollout per pod, from the server's audit log (operator and agents):
exec requests + pod patches + ConfigMap GETs (the agents' open watch delivers the
change without a request).  Agent RSS: each agent process after the
changes (VmRSS and peak VmHWM), against the operator process (this one) as a baseline.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

from bench.common import Result, Summary, hwm_mib, rss_mib, run_with_postfix, stats, table
from bench.harness import (
    API_SERVER_NOTE,
    Env,
    Pods,
    bench_config,
    create_many,
    local_pods,
    operating,
)
from bench.harness import policy as policy_object
from testbed.inpod import in_pod, pod_environment

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


def _agent_cmd(namespace: str, name: str, pods: Pods) -> list[str]:
    inst = pods.instances[name]
    return in_pod([sys.executable, "-m", "mailtls_operator.cli", "agent",
                   "--instance", "relay", "--namespace", namespace, "--pod", name,
                   "--map-path", str(inst.map_path), "--map-type", inst.settings.map_type,
                   "--configmap-dir", str(inst.configmap_dir), "--observe-interval", "0",
                   "--probe-interval", "0", "--log-level", "WARNING"])


async def _mode(mode: str, result: Result) -> dict[str, Any]:
    parallelism = 3 if mode == "exec x3" else 1
    config = bench_config(debounce=DEBOUNCE, max_delay=1.0, parallelism=parallelism,
                          default_strategy="agent" if mode == "agent" else "exec")
    with local_pods(PODS) as pods:
        def seed(env: Env) -> None:
            create_many(env.client, env.ns, [policy_object(f"p{i:03d}", **_spec(i, "may"))
                                             for i in range(POLICIES)])

        async with operating(config, pods, seed=seed) as env:
            procs: list[subprocess.Popen[bytes]] = []
            users = {env.identity.user}
            try:
                if mode == "agent":
                    agent = await asyncio.to_thread(env.cluster.identity, env.ns,
                                                    "mailtls-agent")
                    users.add(agent.user)
                    in_pod_env = pod_environment(env.cluster.plane,
                                                 pods.base / "serviceaccount", agent.token)
                    for name in pods.names:
                        inst = pods.instances[name]
                        procs.append(subprocess.Popen(
                            _agent_cmd(env.ns, name, pods),
                            env={**os.environ, **inst.env, **in_pod_env,
                                 "PATH": inst.env["PATH"] + ":" + os.environ.get("PATH", "")},
                            stdin=subprocess.DEVNULL))
                await env.until(lambda: env.entries() == POLICIES
                                and env.pods_on(env.revision() or "", pods.names), 60)
                await env.settle(quiet=0.5)
                latencies, applied, requests = [], [], []
                for n in range(CHANGES):
                    level = "encrypt" if (n // POLICIES) % 2 == 0 else "may"  # a change
                    lat, total, req = await _change(env, users, n % POLICIES, level)
                    latencies.append(lat)
                    applied.append(total)
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
            "apply_to_enforced": stats(applied), "apply_samples": applied,
            "requests_per_pod": sum(requests) / len(requests) / PODS,
            "agent_rss_mib": rss, "agent_hwm_mib": hwm}


async def _change(env: Env, users: set[str], i: int,
                  level: str) -> tuple[float, float, int]:
    """One change; (ConfigMap stored -> last pod verified, apply -> last pod verified,
    the operator's and agents' API requests of the rollout)."""
    old = env.revision()
    seen = len(env.commits)
    mark = await asyncio.to_thread(env.audit.barrier)
    returned = await asyncio.to_thread(env.replace_spec_sync, env.ns, f"p{i:03d}",
                                       _spec(i, level))

    def stored() -> tuple[str, float] | None:
        for c in env.commits[seen:]:
            rev = (c.obj["metadata"].get("annotations") or {}).get("mailtls.io/revision")
            if c.resource == "configmaps" and rev not in (None, old):
                return rev, c.at
        return None

    revision, start = await env.until(stored, 30)

    def verified() -> float | None:
        done: dict[str, float] = {}
        for c in env.commits[seen:]:
            ann = c.obj["metadata"].get("annotations") or {}
            if c.resource == "pods" and ann.get("mailtls.io/applied-revision") == revision:
                done.setdefault(c.name, c.at)
        return max(done.values()) if len(done) == PODS else None

    end = await env.until(verified, 30)
    await env.settle(quiet=0.3)  # the agents' second report (queue, routing) counts too
    await asyncio.to_thread(env.audit.barrier)
    requests = sum(env.audit.count(None, "pods", subresource="exec", user=u, since=mark)
                   + env.audit.count("patch", "pods", user=u, since=mark)
                   + env.audit.count("get", "configmaps", user=u, since=mark) for u in users)
    return end - start, end - returned, requests


async def _scenario(result: Result) -> None:
    result.config = {"pods": PODS, "changes": CHANGES, "policies": POLICIES,
                     "debounce_s": DEBOUNCE, "map_type": "lmdb", "api_server": API_SERVER_NOTE}
    rows = [await _mode(mode, result) for mode in ("exec", "exec x3", "agent")]
    result.rows.extend(rows)
    by = {r["mode"]: r for r in rows}
    print(table(("ConfigMap stored -> 3 pods verified", "p50 s", "p95 s", "min s", "max s",
                 "API requests / rollout / pod"),
                [(f"{r['mode']} (n={r['latency']['n']})", r["latency"]["p50"],
                  r["latency"]["p95"], r["latency"]["min"], r["latency"]["max"],
                  f"{r['requests_per_pod']:.1f}") for r in rows]))
    print(table(("apply -> 3 pods enforced", "p50 s", "p95 s", "min s", "max s"),
                [(f"{r['mode']} (n={r['apply_to_enforced']['n']})",
                  r["apply_to_enforced"]["p50"], r["apply_to_enforced"]["p95"],
                  r["apply_to_enforced"]["min"], r["apply_to_enforced"]["max"])
                 for r in rows]))
    agent = by["agent"]
    operator_rss = rss_mib()
    print(table(("process", "RSS MiB", "peak MiB"),
                [(f"agent {i}", rss, hwm) for i, (rss, hwm) in
                 enumerate(zip(agent["agent_rss_mib"], agent["agent_hwm_mib"], strict=True))]
                + [("baseline: this benchmark process (operator + watches)", operator_rss,
                    hwm_mib())]))
    result.notes.append("exec requests count one API request per pod command (the exec "
                        "websocket upgrade); the agents' long-lived watch is not counted")
    p50 = {m: by[m]["latency"]["p50"] for m in by}
    applied = {m: by[m]["apply_to_enforced"]["p50"] for m in by}
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
        Summary(NAME, "exec via kube-apiserver+kwok: apply -> 3 pods enforced p50",
                applied["exec"], "s", applied["agent"], "agent p50"),
        Summary(NAME, "agent: apply -> 3 pods enforced p50", applied["agent"], "s",
                applied["exec"], "exec p50"),
    ]
    result.notes.append("real server: the exec modes' pod commands are execs through "
                        "kube-apiserver and kwok (the emulation's runs ran them locally), and "
                        "the agents watch kube-apiserver; 'stored' is when the benchmark's "
                        "watch received the object (the emulation stamped its commit)")

