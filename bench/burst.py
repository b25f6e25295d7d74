"""Burst coalescing: 1,000 policies applied at once through the real kube-apiserver.

Two real local Postfix instances as kwok pods of instance ``relay`` (exec strategy,
every pod command an exec through kube-apiserver), the operator with its production
debounce settings. 1,000 MailTLSPolicy objects are created concurrently by a client (32
in flight). Counted: ConfigMap writes (the operator's write requests in the server's
audit log), renders, and rollouts per pod (the runner's ``postmap`` compiles of the
staged TLS policy table in that pod; cross-checked with the operator's
``InstanceState.rollouts``). Baseline: what a naive one-rollout-per-event operator does,
1,000 of each; its time is estimated from the duration of one real rollout measured
here. Targets (DESIGN.md §7, the issue): at most 3 ConfigMap writes and at most 2
rollouts per pod.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.common import Result, Summary, run_with_postfix, table
from bench.harness import (
    API_SERVER_NOTE,
    INSTANCE,
    PLURAL,
    gather_limited,
    local_pods,
    operating,
    policy,
)
from mailtls_operator.controller import Config
from testbed.auditlog import WRITES

NAME = "burst_coalescing"
POLICIES = 1000
PODS = 2
IN_FLIGHT = 32
PROBE_WINDOW = 5.0
MAX_WRITES = 3
MAX_ROLLOUTS = 2


def run() -> Result:
    return run_with_postfix(
        NAME, "Burst coalescing: 1,000 applies at once, 2 Postfix pods", _scenario)


async def _scenario(result: Result) -> None:
    config = Config()  # production defaults (debounce 0.5 s, max_delay 5 s, probes on)
    result.config = {"policies": POLICIES, "pods": PODS, "client_in_flight": IN_FLIGHT,
                     "debounce_s": config.debounce, "max_delay_s": config.max_delay,
                     "parallelism": config.parallelism, "api_server": API_SERVER_NOTE}
    with local_pods(PODS) as pods:
        async with operating(config, pods) as env:
            runner = env.runner
            key = (env.ns, INSTANCE)
            await env.until(lambda: env.revision() is not None
                            and env.pods_on(env.revision() or "", pods.names))
            await env.settle()
            state = env.operator.states[key]
            before: dict[str, Any] = {"renders": state.renders, "rollouts": state.rollouts,
                      "writes": state.configmap_writes,
                      "compiles": {p: runner.table_compiles(p) for p in pods.names}}
            mark = await asyncio.to_thread(env.audit.barrier)
            spans_before = len(runner.spans)

            objs = [policy(f"p{i:04d}", destinations=[f"d{i}.example", f".d{i}.example"],
                           level=("may", "encrypt", "dane")[i % 3]) for i in range(POLICIES)]
            started = time.perf_counter()
            await gather_limited([asyncio.to_thread(env.create_sync, o) for o in objs],
                                 IN_FLIGHT)
            applied = time.perf_counter()
            await env.until(lambda: env.entries() == 2 * POLICIES
                            and env.pods_on(env.revision() or "", pods.names), 180)
            enforced = time.perf_counter()
            writes_enforced = env.requests(WRITES, "configmaps", since=mark)
            statuses_enforced = env.requests("patch", PLURAL, subresource="status",
                                             since=mark)
            await env.settle(timeout=180)
            settled = time.perf_counter()
            # Then the observer: queue reads and (production default) a posttls-finger
            # probe of every changed destination.  Sampled for PROBE_WINDOW s, not awaited.
            await asyncio.sleep(PROBE_WINDOW)
            window_end = time.perf_counter()

            await asyncio.to_thread(env.audit.barrier)
            writes = env.requests(WRITES, "configmaps", since=mark)
            compiles = {p: runner.table_compiles(p) - before["compiles"][p] for p in pods.names}
            renders = state.renders - before["renders"]
            rollouts = state.rollouts - before["rollouts"]
            status_patches = env.requests("patch", PLURAL, subresource="status", since=mark)
            events = env.requests("create", "events", since=mark)
            spans = runner.spans[spans_before:]
    probes = [sp for sp in spans if sp.kind == "posttls-finger"]
    observer = [sp for sp in spans if not sp.rollout and sp.kind != "posttls-finger"]
    in_window = [sp for sp in probes if settled <= sp.end <= window_end]
    probe_rate = len(in_window) / (window_end - settled)
    probe_run = sum(sp.seconds for sp in in_window) / len(in_window) if in_window else None
    backlog_s = POLICIES / probe_rate if probe_rate else None  # one probeable key each

    # One rollout of the final table (all pods, one after the other), as measured here:
    # a naive operator pays it once per event.
    last = _last_rollout(spans, pods.names)
    per_rollout = (last[-1].end - last[0].start) if last else None
    naive_s = per_rollout * POLICIES if per_rollout else None
    rollout_max = max(compiles.values()) if compiles else 0
    row: dict[str, Any] = {
        "policies": POLICIES, "configmap_writes": writes, "renders": renders,
        "rollouts_operator": rollouts, "rollouts_per_pod": compiles,
        "status_patches": status_patches, "events_posted": events,
        "apply_s": applied - started, "apply_to_enforced_s": enforced - started,
        "apply_to_settled_s": settled - started, "probe_window_s": PROBE_WINDOW,
        "probes_per_s": probe_rate, "probe_run_mean_s": probe_run,
        "probe_all_estimate_s": backlog_s,
        "configmap_writes_at_enforced": writes_enforced,
        "status_patches_at_enforced": statuses_enforced,
        "probes_posttls_finger": len(probes),
        "probe_seconds_sum": sum(sp.seconds for sp in probes),
        "observer_other_commands": len(observer),
        "one_rollout_all_pods_s": per_rollout, "naive_rollouts_s_estimate": naive_s,
        "naive_configmap_writes": POLICIES, "naive_rollouts_per_pod": POLICIES,
    }
    result.rows.append(row)
    print(table(("", "measured", "naive (1 per event)", "ratio", "target"), [
        ("ConfigMap writes", writes, POLICIES, f"{writes / POLICIES:.3g}x", f"<= {MAX_WRITES}"),
        ("renders", renders, POLICIES, f"{renders / POLICIES:.3g}x", "-"),
        *[(f"rollouts into {p} (postmap compiles)", n, POLICIES, f"{n / POLICIES:.3g}x",
           f"<= {MAX_ROLLOUTS}") for p, n in compiles.items()],
        ("rollouts (InstanceState.rollouts)", rollouts, POLICIES,
         f"{rollouts / POLICIES:.3g}x", f"<= {MAX_ROLLOUTS}"),
        ("status patches / events posted", f"{status_patches} / {events}", "-", "-", "-"),
        ("posttls-finger probes (observer)", len(probes), "-", "-", "-"),
    ]))
    print(table(("timeline (s from first apply)", "seconds"), [
        ("client finished 1,000 creates", applied - started),
        ("ConfigMap complete and every pod verified on it", enforced - started),
        ("worker idle (statuses written)", settled - started),
        (f"observer: posttls-finger probes/s (sampled {PROBE_WINDOW:g} s)", probe_rate),
        ("observer: mean run time of one posttls-finger", probe_run),
        ("observer: time to probe all 1,000 (estimate)", backlog_s),
        ("one rollout, all pods (measured)", per_rollout),
        ("naive: 1,000 rollouts (estimate)", naive_s),
    ]))
    result.summary += [
        Summary(NAME, "ConfigMap writes for 1,000 applies", writes, "", POLICIES, "naive",
                f"<= {MAX_WRITES}", writes <= MAX_WRITES),
        Summary(NAME, "rollouts per pod (max of 2 pods)", rollout_max, "", POLICIES, "naive",
                f"<= {MAX_ROLLOUTS}", rollout_max <= MAX_ROLLOUTS),
        Summary(NAME, "1,000 applies -> all pods enforced", enforced - started, "s", naive_s,
                "naive est."),
        Summary(NAME, "1,000 applies -> statuses written", settled - started, "s",
                enforced - started, "enforced"),
        Summary(NAME, "then: probing 1,000 destinations (est.)", backlog_s, "s",
                enforced - started, "enforced"),
    ]
    result.notes.append("real server: 1,000 creates through kube-apiserver (32 in flight) and "
                        "every pod command an exec through it; the emulation's runs stored "
                        "objects in memory and ran pod commands locally")
    result.notes.append("rollouts per pod = postmap compiles of the staged TLS policy table "
                        "in that pod (exec calls); naive time = 1,000 x one measured "
                        "rollout of the final table to both pods")


def _last_rollout(spans: list[Any], pods: list[str]) -> list[Any]:
    """The spans of the last rollout: from the last compile's first pod to the end."""
    compiles = [i for i, s in enumerate(spans) if s.kind == "postmap"
                and s.argv[-1].endswith("tls_policy.mailtls-new") and s.pod == pods[0]]
    if not compiles:
        return []
    first = compiles[-1]
    while first > 0 and spans[first - 1].pod == pods[0] and spans[first - 1].kind == "write":
        first -= 1
    return [s for s in spans[first:] if s.rollout]
