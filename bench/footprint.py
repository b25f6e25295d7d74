"""Operator footprint: RSS and CPU time of the operator process with 10,000 policies.

The operator runs alone in a subprocess (``bench/operator_proc.py``: Kopf + the
operator, no test code, no emulator), logged in to the API emulation served by
this process over loopback; two local Postfix pods of instance ``relay``.  Its
RSS and CPU time are read from ``/proc/PID``; peaks are ``VmHWM``, reset
before each phase through ``/proc/PID/clear_refs``.  Phases, one process:

1. start with no policy (baseline): converge the empty table, then idle;
2. 10,000 policies appear (2 destinations each): validate, render, write the
   ConfigMap, roll out to both pods, write 10,000 statuses, then idle;
3. one policy changes: a rollout of the 20,000-entry table to both pods;

then a restart: a fresh operator process against the same, converged state
(list, validate and render 10,000 policies; nothing to write); its idle RSS is read
``IDLE_GRACE`` seconds after it went quiet, as the first process' is.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    RUN,
    Result,
    Summary,
    cpu_seconds,
    hwm_mib,
    reset_hwm,
    rss_mib,
    run_with_postfix,
    table,
)
from bench.harness import (
    ANN_APPLIED,
    ANN_REVISION,
    CM_NAME,
    INSTANCE,
    NAMESPACE,
    BenchServer,
    Pods,
    client_for,
    local_pods,
    policy,
    serving,
)
from mailtls_operator import configmap
from mailtls_operator.configmap import LABEL_INSTANCE

NAME = "operator_footprint"
POLICIES = 10_000
PODS = 2
IDLE_WINDOW = 4.0
IDLE_GRACE = 5.0  # Kopf's per-object workers end 5 s after their last event
QUIET = 1.5
LEVELS = ("may", "encrypt", "secure", "verify")


def _policy(i: int, level: str | None = None) -> dict[str, Any]:
    level = level or LEVELS[i % len(LEVELS)]
    spec: dict[str, Any] = {"destinations": [f"partner{i}.example", f".partner{i}.example"],
                            "level": level}
    if level in ("secure", "verify"):
        spec["match"] = ["nexthop", "dot-nexthop"]
    return policy(f"p{i:05d}", **spec)


def run() -> Result:
    return run_with_postfix(
        NAME, "Operator footprint with 10,000 policies (operator in a subprocess)", _scenario)


class Child:
    """The operator process."""

    def __init__(self, url: str, pods: Pods, workdir: Path, tag: str) -> None:
        pods_file = workdir / "pods.json"
        pods_file.write_text(json.dumps([{"name": n, "root": str(i.root)}
                                         for n, i in pods.instances.items()]))
        self.report = workdir / f"imports-{tag}.json"
        self.log_path = workdir / f"operator-{tag}.log"
        self._log = self.log_path.open("wb")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.operator_proc", "--url", url, "--pods",
             str(pods_file), "--report", str(self.report)],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the operator process exited ({self.proc.returncode}): "
                               f"{self.log_path.read_text()[-3000:]}")

    def rss(self) -> float:
        return rss_mib(self.pid)

    def hwm(self) -> float:
        return hwm_mib(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def imports(self) -> dict[str, float]:
        try:
            data: dict[str, float] = json.loads(self.report.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


async def _poll(predicate: Callable[[], Any], child: Child, timeout: float,
                interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        child.check()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"operator footprint: {predicate.__doc__ or predicate!r} "
                               f"not within {timeout} s")
        await asyncio.sleep(interval)


async def _quiet(server: BenchServer, child: Child, quiet: float = QUIET,
                 timeout: float = 300.0) -> float:
    """Until the operator sent no request and used (almost) no CPU for ``quiet`` s; returns
    when it was last busy.  CPU counts too: validating 10,000 policies sends nothing."""
    deadline = time.monotonic() + timeout
    count, cpu = len(server.request_log), child.cpu()
    since = time.perf_counter()
    while time.perf_counter() - since < quiet:
        child.check()
        if time.monotonic() > deadline:
            raise TimeoutError("the operator never went quiet")
        await asyncio.sleep(0.1)
        now_count, now_cpu = len(server.request_log), child.cpu()
        if now_count != count or now_cpu - cpu >= 0.03:  # 30% of a CPU over the sample
            since = time.perf_counter()
        count, cpu = now_count, now_cpu
    return since


def _cm(server: BenchServer) -> dict[str, Any]:
    # Polled: read the stored object without the deep copy of get_object (a 1 MB ConfigMap).
    spec = server.spec("v1/configmaps")
    return server._current((spec.key, NAMESPACE, CM_NAME)) or {}


def _revision(server: BenchServer) -> str | None:
    rev: str | None = ((_cm(server).get("metadata") or {}).get("annotations") or {}).get(
        ANN_REVISION)
    return rev


def _entries(server: BenchServer) -> int:
    """Policy lines in the stored table, whatever its shape (plain, gzip, split in parts)."""
    bodies = [cm for cm in server.list_objects("v1/configmaps", NAMESPACE)
              if ((cm.get("metadata") or {}).get("labels") or {}).get(LABEL_INSTANCE)
              == INSTANCE]
    try:
        text = configmap.reassemble(bodies)
    except ValueError:  # a half-written set
        return -1
    if not text:
        return 0
    return sum(1 for ln in text.split("\n") if ln and not ln.startswith("#")) - 1


def _pods_on(server: BenchServer, names: list[str], revision: str | None) -> bool:
    if revision is None:
        return False
    spec = server.spec("v1/pods")
    for name in names:
        pod = server._current((spec.key, NAMESPACE, name)) or {}
        if ((pod.get("metadata") or {}).get("annotations") or {}).get(ANN_APPLIED) != revision:
            return False
    return True


async def _scenario(result: Result) -> None:
    result.config = {"policies": POLICIES, "destinations_per_policy": 2, "pods": PODS,
                     "idle_window_s": IDLE_WINDOW, "quiet_s": QUIET,
                     "operator": "subprocess (bench/operator_proc.py), Config() defaults but "
                                 "probe_enforced=False (see burst_coalescing for probes)"}
    phases: list[dict[str, Any]] = []
    with local_pods(PODS) as pods, tempfile.TemporaryDirectory(prefix="mailtls-fp-") as tmp:
        async with serving() as server:
            pods.seed(server)
            url = str(server.url).rstrip("/")
            child = Child(url, pods, Path(tmp), "first")
            try:
                phases += await _first_process(server, child, pods)
            finally:
                child.stop()
            imports = child.imports()
            server.reset_log()
            child = Child(url, pods, Path(tmp), "restart")
            try:
                phases += await _restart(server, child, pods)
            finally:
                child.stop()
            restart_writes = server.request_count(("create", "patch", "update", "delete"))
    result.rows += phases
    result.rows.append({"import_rss_mib": imports, "restart_writes": restart_writes})
    by = {p["phase"]: p for p in phases}
    print(table(("phase", "wall s", "CPU s", "RSS MiB (end)", "peak RSS MiB", "API requests"),
                [(p["phase"], p["wall_s"], p["cpu_s"], p["rss_mib"], p["peak_mib"],
                  p["requests"]) for p in phases]))
    for p in phases:
        if p["requests"]:
            print(f"{p['phase']}: " + ", ".join(f"{n} {k}" for k, n in
                                                sorted(p["requests_by_kind"].items())))
    if imports:
        print("RSS after imports: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in imports.items()))
    print(f"restart with converged state: {restart_writes} write requests")
    print(f"10k policies appear -> every pod enforces them: "
          f"{by['load 10k policies']['write_to_enforced_s']:.2f} s; one policy change with 10k "
          f"policies -> every pod enforced: "
          f"{by['rollout, 10k policies']['write_to_enforced_s']:.2f} s")
    base, idle = by["idle, no policy"], by["idle, 10k policies"]
    enforced_small = _enforce_p50()
    roll, load, restart = by["rollout, 10k policies"], by["load 10k policies"], \
        by["restart with 10k policies"]
    result.summary += [
        Summary(NAME, "RSS idle, 10k policies", idle["rss_mib"], "MiB", base["rss_mib"],
                "no policy"),
        Summary(NAME, "peak RSS during rollout, 10k", roll["peak_mib"], "MiB", base["rss_mib"],
                "no policy"),
        Summary(NAME, "peak RSS loading 10k policies", load["peak_mib"], "MiB",
                base["rss_mib"], "no policy"),
        Summary(NAME, "RSS idle after restart, 10k", restart["idle_rss_mib"], "MiB",
                base["rss_mib"], "no policy"),
        Summary(NAME, "CPU idle, 10k policies", idle["cpu_s"] / IDLE_WINDOW * 100, "%",
                base["cpu_s"] / IDLE_WINDOW * 100, "no policy"),
        Summary(NAME, "10k policies appear -> enforced", load["write_to_enforced_s"], "s",
                load["wall_s"], "wall to quiet"),
        Summary(NAME, "CPU to load 10k policies", load["cpu_s"], "s", load["wall_s"], "wall"),
        Summary(NAME, "one policy change, 10k: write -> enforced", roll["write_to_enforced_s"],
                "s", enforced_small, "50 policies"),
        Summary(NAME, "one policy change, 10k: wall to quiet", roll["wall_s"], "s"),
        Summary(NAME, "one policy change, 10k: CPU", roll["cpu_s"], "s", roll["wall_s"], "wall"),
        Summary(NAME, "one policy change, 10k: API requests", roll["requests"], "",
                2 + PODS, "needed"),
        Summary(NAME, "restart with 10k: CPU to converge", restart["cpu_s"], "s",
                restart["wall_s"], "wall"),
        Summary(NAME, "restart with 10k: API write requests", restart_writes, "", 0, "needed"),
        *_budget(load, base, idle, restart),
    ]
    result.notes.append("RSS of the operator process includes the local pod runner's imports "
                        "(aiosmtpd, cryptography), which production does not load: see "
                        "'RSS after imports'")
    result.notes.append(f"'needed' API requests for one change: 1 ConfigMap write, {PODS} pod "
                        "annotations, 1 status patch of the changed policy")
    result.notes.append("the API emulation runs in the benchmark process, not in the operator's")


def _budget(load: dict[str, Any], base: dict[str, Any], idle: dict[str, Any],
            restart: dict[str, Any]) -> list[Summary]:
    """Issue 13's targets: a good citizen of a shared cluster, measured in this run."""
    kinds = load["requests_by_kind"]
    writes = sum(n for k, n in kinds.items()
                 if k.split(" ")[0] in ("create", "patch", "update", "delete"))
    status = kinds.get("patch mailtlspolicies/status", 0)
    events = sum(n for k, n in kinds.items() if k.startswith("create") and "events" in k)
    per_policy_kib = (idle["rss_mib"] - base["rss_mib"]) * 1024 / POLICIES
    return [
        Summary(NAME, "10k load: status patches per policy", status / POLICIES, "", 1.0,
                "one each", "<= 1.1", status / POLICIES <= 1.1),
        Summary(NAME, "10k load: API writes per policy", writes / POLICIES, "", 1.0,
                "one each", "<= 2.1", writes / POLICIES <= 2.1),
        Summary(NAME, "10k load: Events", events, "", POLICIES, "policies", "only to act on",
                None),
        Summary(NAME, "10k load: last create -> table on every pod",
                load["last_create_to_enforced_s"], "s", load["creating_s"],
                "creating them", "<= 5 s", load["last_create_to_enforced_s"] <= 5.0),
        Summary(NAME, "RSS idle, 10k policies (target)", idle["rss_mib"], "MiB",
                base["rss_mib"], "no policy", "<= 150 MiB", idle["rss_mib"] <= 150.0),
        Summary(NAME, "RSS idle after restart, 10k (target)", restart["idle_rss_mib"],
                "MiB", base["rss_mib"], "no policy", "<= 150 MiB",
                restart["idle_rss_mib"] <= 150.0),
        Summary(NAME, "state per policy (RSS rise / 10k)", per_policy_kib, "KiB", None, "",
                "", None),
        Summary(NAME, "restart with 10k: CPU (target)", restart["cpu_s"], "s",
                restart["wall_s"], "wall", "<= 5 s", restart["cpu_s"] <= 5.0),
    ]


def _enforce_p50() -> float | None:
    """p50 write -> enforced of enforce_latency (50 policies) in this run, if it ran."""
    other = RUN.get("enforce_latency")
    if other is None or other.skipped or not other.rows:
        return None
    p50: float = other.rows[0]["stats"]["total"]["p50"]
    return p50


def _phase(name: str, child: Child, started: float, cpu0: float, reqs: int,
           server: BenchServer, ended: float | None = None) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for r in server.request_log[reqs:]:
        what = f"{r.verb} {r.resource}{'/' + r.subresource if r.subresource else ''}"
        kinds[what] = kinds.get(what, 0) + 1
    return {"phase": name, "wall_s": (ended or time.perf_counter()) - started,
            "cpu_s": child.cpu() - cpu0, "rss_mib": child.rss(), "peak_mib": child.hwm(),
            "requests": len(server.request_log) - reqs, "requests_by_kind": kinds}


async def _first_process(server: BenchServer, child: Child, pods: Pods) -> list[dict[str, Any]]:
    out = []
    # 1. no policy: the operator converges the empty table and goes idle.
    started, reqs = child.started, len(server.request_log)
    await _poll(lambda: _pods_on(server, pods.names, _revision(server)), child, 60)
    ended = await _quiet(server, child)
    out.append(_phase("start, no policy", child, started, 0.0, reqs, server, ended))
    await asyncio.sleep(IDLE_GRACE)
    cpu0, t0 = child.cpu(), time.perf_counter()
    reset_hwm(child.pid)
    await asyncio.sleep(IDLE_WINDOW)
    out.append(_phase("idle, no policy", child, t0, cpu0, len(server.request_log), server))

    # 2. 10,000 policies appear.
    reset_hwm(child.pid)
    cpu0, t0, reqs = child.cpu(), time.perf_counter(), len(server.request_log)
    for i in range(POLICIES):
        server.seed("mailtlspolicies", _policy(i))
        if i % 500 == 499:
            await asyncio.sleep(0)  # let the server stream the watch events meanwhile
    last_create = time.perf_counter()

    def loaded() -> bool:
        """the 10k-policy table on every pod"""
        rev = _revision(server)
        return _entries(server) == 2 * POLICIES and _pods_on(server, pods.names, rev)

    await _poll(loaded, child, 300, interval=0.2)
    enforced = time.perf_counter()
    ended = await _quiet(server, child, timeout=600)
    out.append({**_phase("load 10k policies", child, t0, cpu0, reqs, server, ended),
                "write_to_enforced_s": enforced - t0,
                "last_create_to_enforced_s": enforced - last_create,
                "creating_s": last_create - t0})
    await asyncio.sleep(IDLE_GRACE)
    cpu0, t0 = child.cpu(), time.perf_counter()
    reset_hwm(child.pid)
    await asyncio.sleep(IDLE_WINDOW)
    out.append(_phase("idle, 10k policies", child, t0, cpu0, len(server.request_log), server))

    # 3. one policy changes: the whole 20,000-entry table goes to both pods again.
    old = _revision(server)
    reset_hwm(child.pid)
    cpu0, t0, reqs = child.cpu(), time.perf_counter(), len(server.request_log)
    with client_for(server) as client:
        import kubernetes.client

        custom = kubernetes.client.CustomObjectsApi(client)
        new_spec = _policy(0, "encrypt")["spec"]
        await asyncio.to_thread(
            custom.patch_namespaced_custom_object, "mailtls.io", "v1alpha1", NAMESPACE,
            "mailtlspolicies", "p00000", [{"op": "replace", "path": "/spec", "value": new_spec}],
            _content_type="application/json-patch+json")

    def rolled() -> bool:
        """the changed table on every pod"""
        rev = _revision(server)
        return rev != old and _pods_on(server, pods.names, rev)

    await _poll(rolled, child, 300, interval=0.05)
    enforced = time.perf_counter()
    ended = await _quiet(server, child)
    out.append({**_phase("rollout, 10k policies", child, t0, cpu0, reqs, server, ended),
                "write_to_enforced_s": enforced - t0})
    return out


async def _restart(server: BenchServer, child: Child, pods: Pods) -> list[dict[str, Any]]:
    """A fresh operator process against the converged state: reads, validates, renders."""
    reqs = len(server.request_log)
    watches = {r: server.watch_count(r) for r in ("mailtlspolicies", "pods", "configmaps")}

    def watching() -> bool:
        """the restarted operator watching policies, pods and ConfigMaps"""
        return all(server.watch_count(r) > n for r, n in watches.items())

    await _poll(watching, child, 120)
    ended = await _quiet(server, child, quiet=2.0)
    phase = _phase("restart with 10k policies", child, child.started, 0.0, reqs, server, ended)
    await asyncio.sleep(IDLE_GRACE)  # idle, as the first process' idle RSS is read
    return [{**phase, "idle_rss_mib": child.rss()}]
