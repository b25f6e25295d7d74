"""Operator footprint: RSS and CPU time of the operator process with 10,000 policies.

The operator runs alone in a subprocess (``bench/operator_proc.py``: Kopf + the
operator with the production exec runner, no test code), logged in to the real
kube-apiserver of the run's cluster with a ServiceAccount token of its own; two local
Postfix instances as kwok pods of instance ``relay`` (every pod command an exec
through kube-apiserver).  Policies are created through the server by 16 client threads;
the operator's requests are counted from the server's audit log (its user).  Its
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
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes.client

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
    ANN_REVISION,
    API_SERVER_NOTE,
    CM_NAME,
    GROUP,
    OPERATOR_SA,
    PLURAL,
    VERSION,
    Pods,
    Recorder,
    cluster,
    create_many,
    fresh_namespace,
    local_pods,
    pods_on,
    policy,
    table_entries,
)
from mailtls_operator.execrunner import KubernetesExecRunner
from mailtls_operator.podrunner import PodRef
from testbed.auditlog import WRITES, AuditTail
from testbed.controlplane import Identity
from testbed.kwokcluster import exec_ready
from testbed.wait import until_async

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

    def __init__(self, identity: Identity, namespace: str, workdir: Path, tag: str) -> None:
        self.report = workdir / f"imports-{tag}.json"
        self.log_path = workdir / f"operator-{tag}.log"
        self._log = self.log_path.open("wb")
        self.started = time.perf_counter()
        env = {**os.environ, "KUBECONFIG": str(identity.kubeconfig)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.operator_proc", "--kubeconfig",
             str(identity.kubeconfig), "--namespace", namespace, "--report", str(self.report)],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env)
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
    return await until_async(predicate, timeout, "operator footprint: "
                             f"{predicate.__doc__ or predicate!r}", every=interval,
                             check=child.check)


@dataclass
class Scene:
    """What the phases read: the server's audit log, the bench's watch, the operator's
    identity, the pods."""

    audit: AuditTail
    recorder: Recorder
    user: str
    pods: Pods
    namespace: str

    def requests(self) -> int:
        """The operator's requests logged so far (read now)."""
        self.audit.poll()
        return self.audit.count(None, None, subresource=None, user=self.user)

    def index(self) -> int:
        """Where the log is now: what later phases count from."""
        return self.audit.poll()


async def _quiet(scene: Scene, child: Child, quiet: float = QUIET,
                 timeout: float = 300.0) -> float:
    """Until the operator sent no request and used (almost) no CPU for ``quiet`` s; returns
    when it was last busy.  CPU counts too: validating 10,000 policies sends nothing."""
    deadline = time.monotonic() + timeout
    count, cpu = scene.requests(), child.cpu()
    since = time.perf_counter()
    while time.perf_counter() - since < quiet:
        child.check()
        if time.monotonic() > deadline:
            raise TimeoutError("the operator never went quiet")
        await asyncio.sleep(0.1)
        now_count, now_cpu = scene.requests(), child.cpu()
        if now_count != count or now_cpu - cpu >= 0.03:  # 30% of a CPU over the sample
            since = time.perf_counter()
        count, cpu = now_count, now_cpu
    return since


def _revision(scene: Scene) -> str | None:
    cm = scene.recorder.get("configmaps", CM_NAME) or {}
    rev: str | None = ((cm.get("metadata") or {}).get("annotations") or {}).get(ANN_REVISION)
    return rev


def _entries(scene: Scene) -> int:
    """Policy lines in the stored table, whatever its shape (plain, gzip, split in parts)."""
    return table_entries(scene.recorder)


def _pods_on(scene: Scene, revision: str | None) -> bool:
    return pods_on(scene.recorder, revision, scene.pods.names)


async def _scenario(result: Result) -> None:
    result.config = {"policies": POLICIES, "destinations_per_policy": 2, "pods": PODS,
                     "idle_window_s": IDLE_WINDOW, "quiet_s": QUIET,
                     "operator": "subprocess (bench/operator_proc.py), Config() defaults but "
                                 "probe_enforced=False (see burst_coalescing for probes)",
                     "api_server": API_SERVER_NOTE}
    phases: list[dict[str, Any]] = []
    plane = cluster()
    with local_pods(PODS) as pods, tempfile.TemporaryDirectory(prefix="mailtls-fp-") as tmp:
        ns = await asyncio.to_thread(fresh_namespace, "footprint")
        identity = await asyncio.to_thread(plane.identity, ns, OPERATOR_SA)
        with plane.api_client(pool=32) as admin:
            for name, inst in pods.instances.items():
                await asyncio.to_thread(plane.postfix_pod, ns, name, inst)
            await exec_ready(KubernetesExecRunner(admin), [PodRef(ns, n) for n in pods.names])
            recorder = await asyncio.to_thread(Recorder(admin, ns, keep=False).start)
            scene = Scene(plane.audit(), recorder, identity.user, pods, ns)
            try:
                child = Child(identity, ns, Path(tmp), "first")
                try:
                    phases += await _first_process(scene, child, admin)
                finally:
                    child.stop()
                imports = child.imports()
                mark = await asyncio.to_thread(scene.audit.barrier)
                child = Child(identity, ns, Path(tmp), "restart")
                try:
                    phases += await _restart(scene, child, mark)
                finally:
                    child.stop()
                await asyncio.to_thread(scene.audit.barrier)
                restart_writes = scene.audit.count(WRITES, None, subresource=None,
                                                   user=scene.user, since=mark)
            finally:
                await asyncio.to_thread(recorder.stop)
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
    result.notes.append(f"'needed' API requests for one change: 1 ConfigMap write, {PODS} pod "
                        "annotations, 1 status patch of the changed policy (pod commands, "
                        "execs through kube-apiserver, counted apart)")
    result.notes.append("real server: the operator process runs the production exec runner "
                        "(the emulation's runs loaded the local pod runner, aiosmtpd and "
                        "cryptography: about 10 MiB more RSS); policies are created through "
                        "kube-apiserver by 16 client threads (the emulation stored them in "
                        "memory in under a second), so 'creating them' and everything "
                        "timed from the first create include the server's own pace")


def _budget(load: dict[str, Any], base: dict[str, Any], idle: dict[str, Any],
            restart: dict[str, Any]) -> list[Summary]:
    """Issue 13's targets: a good citizen of a shared cluster, measured in this run."""
    kinds = load["requests_by_kind"]
    writes = sum(n for k, n in kinds.items()  # pod commands (exec) are not writes
                 if k.split(" ")[0] in WRITES and not k.endswith("/exec"))
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


def _phase(name: str, child: Child, started: float, cpu0: float, since: int,
           scene: Scene, ended: float | None = None) -> dict[str, Any]:
    scene.audit.barrier()
    kinds = scene.audit.by_kind(user=scene.user, since=since)
    execs = sum(n for k, n in kinds.items() if k.endswith("pods/exec"))
    return {"phase": name, "wall_s": (ended or time.perf_counter()) - started,
            "cpu_s": child.cpu() - cpu0, "rss_mib": child.rss(), "peak_mib": child.hwm(),
            "requests": sum(kinds.values()) - execs, "exec_requests": execs,
            "requests_by_kind": kinds}


async def _first_process(scene: Scene, child: Child,
                         admin: Any) -> list[dict[str, Any]]:
    out = []
    # 1. no policy: the operator converges the empty table and goes idle.
    started, since = child.started, scene.index()
    await _poll(lambda: _pods_on(scene, _revision(scene)), child, 60)
    ended = await _quiet(scene, child)
    out.append(await asyncio.to_thread(_phase, "start, no policy", child, started, 0.0, since,
                                       scene, ended))
    await asyncio.sleep(IDLE_GRACE)
    cpu0, t0, since = child.cpu(), time.perf_counter(), scene.index()
    reset_hwm(child.pid)
    await asyncio.sleep(IDLE_WINDOW)
    out.append(await asyncio.to_thread(_phase, "idle, no policy", child, t0, cpu0, since,
                                       scene))

    # 2. 10,000 policies appear, created through the API server.
    reset_hwm(child.pid)
    since = await asyncio.to_thread(scene.audit.barrier)
    cpu0, t0 = child.cpu(), time.perf_counter()
    last_create = await asyncio.to_thread(create_many, admin, scene.namespace,
                                          (_policy(i) for i in range(POLICIES)))

    def loaded() -> bool:
        """the 10k-policy table on every pod"""
        rev = _revision(scene)
        return _entries(scene) == 2 * POLICIES and _pods_on(scene, rev)

    await _poll(loaded, child, 600, interval=0.2)
    enforced = time.perf_counter()
    ended = await _quiet(scene, child, timeout=900)
    out.append({**await asyncio.to_thread(_phase, "load 10k policies", child, t0, cpu0, since,
                                          scene, ended),
                "write_to_enforced_s": enforced - t0,
                "last_create_to_enforced_s": enforced - last_create,
                "creating_s": last_create - t0})
    await asyncio.sleep(IDLE_GRACE)
    cpu0, t0, since = child.cpu(), time.perf_counter(), scene.index()
    reset_hwm(child.pid)
    await asyncio.sleep(IDLE_WINDOW)
    out.append(await asyncio.to_thread(_phase, "idle, 10k policies", child, t0, cpu0, since,
                                       scene))

    # 3. one policy changes: the whole 20,000-entry table goes to both pods again.
    old = _revision(scene)
    reset_hwm(child.pid)
    since = await asyncio.to_thread(scene.audit.barrier)
    cpu0, t0 = child.cpu(), time.perf_counter()
    custom = kubernetes.client.CustomObjectsApi(admin)
    new_spec = _policy(0, "encrypt")["spec"]
    await asyncio.to_thread(
        custom.patch_namespaced_custom_object, GROUP, VERSION, scene.namespace, PLURAL,
        "p00000", [{"op": "replace", "path": "/spec", "value": new_spec}],
        _content_type="application/json-patch+json")

    def rolled() -> bool:
        """the changed table on every pod"""
        rev = _revision(scene)
        return rev != old and _pods_on(scene, rev)

    await _poll(rolled, child, 300, interval=0.05)
    enforced = time.perf_counter()
    ended = await _quiet(scene, child)
    out.append({**await asyncio.to_thread(_phase, "rollout, 10k policies", child, t0, cpu0,
                                          since, scene, ended),
                "write_to_enforced_s": enforced - t0})
    return out


async def _restart(scene: Scene, child: Child, mark: int) -> list[dict[str, Any]]:
    """A fresh operator process against the converged state: reads, validates, renders."""

    def watching() -> bool:
        """the restarted operator watching policies, pods and ConfigMaps"""
        scene.audit.poll()
        found = {r.resource for r in scene.audit.select("watch", None, user=scene.user,
                                                        since=mark)}
        return found >= {PLURAL, "pods", "configmaps"}

    await _poll(watching, child, 120)
    ended = await _quiet(scene, child, quiet=2.0)
    phase = await asyncio.to_thread(_phase, "restart with 10k policies", child, child.started,
                                    0.0, mark, scene, ended)
    await asyncio.sleep(IDLE_GRACE)  # idle, as the first process' idle RSS is read
    return [{**phase, "idle_rss_mib": child.rss()}]
