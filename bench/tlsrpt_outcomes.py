"""TLS outcomes (issue 26): session -> ``status.outcomes`` latency, and the agent's CPU and
memory per 1,000 sessions.

``python -m bench tlsrpt_outcomes``.  One real Postfix 3.10 instance reporting TLSRPT
(:mod:`testbed.tlsrptworld`: port-53 DNS, a CA-signed loopback sink), its pod an object of
the real kube-apiserver (:mod:`testbed.controlplane`), a real ``mailtls agent`` process
with a pod-bound token on its in-cluster path (as ``agent_rollout`` runs it) and ``mailtls
run`` as a subprocess, as in ``tests/cluster/operating/test_tlsrpt_outcomes.py``.  Two
phases:

1. **latency**: one message at a time to a ``secure`` policy's destination; the clock
   starts when Postfix's ``TLSRPT: status=success`` log line appears (the maillog polled
   every 5 ms; the datagram was sent just before it) and stops when the policy's
   ``status.outcomes`` counts the session (polled every 20 ms).  The agent looks at its
   counts every ``--outcomes-interval`` (0.5 s here; the default is 15 s, which adds up
   to 15 s);
2. **agent cost**: 5,000 datagrams in the measured format (success and the four failure
   types, over 50 policies' keys) sent to the agent's socket at 400 a second; the
   agent's CPU time (``/proc/PID/stat``) above its idle rate over the same time, and its
   RSS, per 1,000 sessions.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import Result, Summary, cpu_seconds, proc_status, stats, table
from testbed import (
    LocalCA,
    LocalInstance,
    free_port,
    postfix_unavailable,
    starttls_sink,
    stop_all,
)
from testbed.controlplane import REPO, ControlPlane, ControlPlaneError, binaries_dir
from testbed.inpod import in_pod, pod_environment
from testbed.postfixroot import build_for
from testbed.tlsrptworld import (
    SOCKET_NAME,
    Port53Dns,
    datagram,
    postfix_wrappers,
    reporting_instance,
    tlsrpt_record,
)
from testbed.wait import until

NAME = "tlsrpt_outcomes"
NS = "bench"
MESSAGES = 10
SESSIONS = 5000
RATE = 400
KEYS = 50
INTERVAL = 0.5
MAILTLS = str(Path(sys.executable).with_name("mailtls"))
FAILURES = [(201, None), (202, None), (204, None), (205, "self-signed_certificate")]


def _datagram(domain: str, n: int) -> bytes:
    """Session ``n`` to ``domain``: 4 in 5 succeed."""
    return datagram(domain, *FAILURES[(n // 5) % len(FAILURES)]) if n % 5 == 4 \
        else datagram(domain)


class _World:
    """The control plane, the namespace, the pod, the Postfix instance, agent, operator."""

    def __init__(self, plane: ControlPlane, base: Path, dns: Port53Dns, port: int,
                 ca_file: str) -> None:
        import kubernetes.client

        self.plane, self.base, self.port = plane, base, port
        self.client = plane.api_client()
        self.core: Any = kubernetes.client.CoreV1Api(self.client)
        self.custom: Any = kubernetes.client.CustomObjectsApi(self.client)
        self.domains = ["secure.test", *(f"d{i:02d}.test" for i in range(KEYS))]
        routes = {}
        for domain in self.domains:
            dns.mail_domain(domain, tlsrpt=tlsrpt_record(domain))
            routes[domain] = f"smtp:{domain}:{port}"
        self.inst: LocalInstance = reporting_instance(base, "relay-0", dns, routes, {}, ca_file)
        self.procs: list[subprocess.Popen[bytes]] = []

    def key(self, domain: str) -> str:
        return f"{domain}:{self.port}"

    def start(self) -> None:
        self.inst.start()
        plane = self.plane
        plane.request("POST", "/api/v1/namespaces", {"metadata": {"name": NS}})
        plane.admin_service_account(NS, "mailtls-agent")
        inst = self.inst
        self.core.create_namespaced_pod(NS, {
            "metadata": {"name": "relay-0", "labels": {"mailtls.io/instance": "relay"},
                         "annotations": {"mailtls.io/strategy": "agent",
                                         "mailtls.io/map-path": str(inst.map_path),
                                         "mailtls.io/map-type": inst.settings.map_type}},
            "spec": {"nodeName": "node-a", "serviceAccountName": "mailtls-agent",
                     "containers": [{"name": "postfix", "image": "postfix"},
                                    {"name": "agent", "image": "mailtls"}]}})
        self.core.patch_namespaced_pod_status("relay-0", NS, {"status": {
            "phase": "Running", "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}]}})
        op_cfg = plane.admin_identity(NS, "mailtls-operator",
                                      self.base / "kubeconfigs" / "operator").kubeconfig
        # the agent as in a pod: its pod-bound token and the CA at the kubelet's path (in a
        # mount namespace of its own), KUBERNETES_SERVICE_HOST/PORT: the production path
        in_pod_env = pod_environment(
            plane, self.base / "serviceaccount",
            plane.service_account_token(NS, "mailtls-agent", pod="relay-0"))
        wrappers = postfix_wrappers(inst, self.base.parent / f"{self.base.name}-bin")
        env = {**os.environ, **inst.env, **in_pod_env, "POD_NAME": "relay-0",
               "POD_NAMESPACE": NS, "PATH": f"{inst.env['PATH']}:{os.environ.get('PATH', '')}"}
        logs = self.base / "logs"
        logs.mkdir()
        self.agent = self._spawn(
            in_pod([sys.executable, "-m", "mailtls_operator.cli", "agent", "--instance", "relay",
                    "--map-path", str(inst.map_path),
                    "--map-type", inst.settings.map_type,
                    "--configmap-dir", str(inst.configmap_dir),
                    "--observe-interval", "0", "--probe-interval", "0",
                    "--outcomes-interval", str(INTERVAL), "--log-level", "WARNING",
                    *(["--postfix-path", str(wrappers)] if wrappers else [])]),
            env, logs / "agent")
        op_env = {**os.environ, "KUBECONFIG": str(op_cfg)}
        op_env.pop("KUBERNETES_SERVICE_HOST", None)
        self._spawn([MAILTLS, "run", "-n", NS, "--log-format", "text", "--metrics", "off",
                     "--health", f"127.0.0.1:{free_port()}", "--debounce", "0.15",
                     "--max-delay", "1.5",
                     "--probe-scope", "audit"], op_env, logs / "operator")
        for domain in self.domains:
            self.custom.create_namespaced_custom_object("mailtls.io", "v1alpha1", NS,
                                                        "mailtlspolicies", {
                "apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy",
                "metadata": {"name": self.policy(domain), "namespace": NS},
                "spec": {"destinations": [self.key(domain)], "level": "secure",
                         "match": ["sink.mailtls.test"], "instances": ["relay"]}})
        until(lambda: all(inst.query(self.key(d)) for d in self.domains), 120,
              "the policies installed by the agent", every=0.02)
        until(lambda: self.outcomes().get("socket"), 60, "the agent's TLSRPT socket",
              every=0.1)

    def _spawn(self, argv: list[str], env: dict[str, str], log: Path
               ) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    @staticmethod
    def policy(domain: str) -> str:
        return "p-" + domain.split(".")[0]

    def outcomes(self) -> dict[str, Any]:
        pod = self.core.read_namespaced_pod("relay-0", NS)
        text = (pod.metadata.annotations or {}).get("mailtls.io/agent-report")
        return (json.loads(text).get("outcomes") or {}) if text else {}

    def succeeded(self, domain: str) -> int:
        status = self.custom.get_namespaced_custom_object(
            "mailtls.io", "v1alpha1", NS, "mailtlspolicies", self.policy(domain)).get("status")
        items = (status or {}).get("outcomes") or []
        return int(items[0]["succeeded"]) if items else 0

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        stop_all([self.inst])
        self.client.close()


def _latency(world: _World) -> list[float]:
    """Log line -> status, one message at a time."""
    out = []
    line = re.compile(r"TLSRPT: status=success, domain=secure\.test")
    for i in range(1, MESSAGES + 1):
        world.inst.submit("user@secure.test")

        def logged(i: int = i) -> bool:
            return len(line.findall(world.inst.maillog())) >= i

        def counted(i: int = i) -> bool:
            return world.succeeded("secure.test") >= i

        until(logged, 30, "the TLSRPT log line", every=0.005)
        start = time.monotonic()
        until(counted, 60, "status.outcomes", every=0.02)
        out.append(time.monotonic() - start)
    return out


def _total(outcomes: dict[str, Any]) -> int:
    return sum(n for k in outcomes.get("keys", []) for n in k["total"].values())


def _cost(world: _World) -> dict[str, float]:
    """Agent CPU and RSS for SESSIONS datagrams at RATE a second, above its idle rate."""
    pid = world.agent.pid
    before_total = _total(world.outcomes())
    idle_cpu, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(10.0)
    idle_rate = (cpu_seconds(pid) - idle_cpu) / (time.monotonic() - t0)
    rss0 = proc_status(pid)["VmRSS"]
    grams = [_datagram(d, n) for n, d in zip(range(SESSIONS),
                                                itertools.cycle(world.domains[1:]))]
    path = str(world.inst.queue_dir / SOCKET_NAME)
    cpu0, t1 = cpu_seconds(pid), time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.settimeout(10)
        for n, gram in enumerate(grams):
            wait = t1 + n / RATE - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            sender.sendto(gram, path)
    until(lambda: _total(world.outcomes()) >= before_total + SESSIONS, 120,
          "every datagram counted and reported", every=0.2)
    spent = time.monotonic() - t1
    cpu = cpu_seconds(pid) - cpu0 - idle_rate * spent
    status = proc_status(pid)
    return {"seconds": spent, "cpu_s": cpu, "cpu_ms_per_1000": cpu / SESSIONS * 1e6,
            "idle_cpu_percent": idle_rate * 100, "rss_before_mib": rss0 / 1024,
            "rss_after_mib": status["VmRSS"] / 1024, "hwm_mib": status["VmHWM"] / 1024,
            "rss_growth_kib_per_1000": (status["VmRSS"] - rss0) / SESSIONS * 1000}


@contextlib.contextmanager
def _world() -> Iterator[_World]:
    base = Path(tempfile.mkdtemp(prefix="mailtls-bench-tlsrpt-"))
    base.chmod(0o755)
    dns = Port53Dns().start()
    ca = LocalCA(base / "ca")
    sink = starttls_sink(base / "certs", name="ca-signed", ca=ca).start()
    world: _World | None = None
    try:
        with ControlPlane(base / "controlplane", binaries=binaries_dir()) as plane:
            plane.apply_crds(sorted((REPO / "crds").glob("*.yaml")))
            world = _World(plane, base, dns, sink.port, str(ca.pem_path))
            try:
                world.start()
                yield world
            finally:
                world.stop()
    finally:
        sink.stop()
        dns.stop()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(base.parent / f"{base.name}-bin", ignore_errors=True)
        build_for("3.10").forget(base)


def run() -> Result:
    result = Result(NAME, "TLS outcomes: session -> status latency; agent cost per 1,000 "
                          "sessions", config={"messages": MESSAGES, "sessions": SESSIONS,
                                              "rate": RATE, "keys": KEYS,
                                              "outcomes_interval": INTERVAL})
    why = postfix_unavailable("3.10")
    try:
        binaries_dir()
    except ControlPlaneError as exc:
        why = why or str(exc)
    if why:
        result.skipped = why
        print(f"skipped: {why}")
        return result
    with _world() as world:
        latency = _latency(world)
        cost = _cost(world)
    lat = stats(latency)
    result.rows = [{"phase": "latency", "seconds": latency, **lat}, {"phase": "cost", **cost}]
    print(table(("log line -> status.outcomes", "n", "p50 s", "p95 s", "max s"),
                [(f"interval {INTERVAL} s", lat["n"], lat["p50"], lat["p95"], lat["max"])]))
    print(table(("agent, per 1,000 sessions", "CPU ms", "RSS growth KiB", "RSS MiB",
                 "peak MiB"),
                [(f"{SESSIONS} at {RATE}/s", cost["cpu_ms_per_1000"],
                  cost["rss_growth_kib_per_1000"], cost["rss_after_mib"], cost["hwm_mib"])]))
    result.summary = [
        Summary(NAME, "session (log line) -> status.outcomes, p50", lat["p50"], "s",
                target=f"outcomes interval {INTERVAL} s"),
        Summary(NAME, "session -> status.outcomes, max", lat["max"], "s"),
        Summary(NAME, "agent CPU per 1,000 sessions", cost["cpu_ms_per_1000"], "ms"),
        Summary(NAME, "agent RSS growth per 1,000 sessions",
                cost["rss_growth_kib_per_1000"], "KiB"),
        Summary(NAME, "agent RSS after the sessions", cost["rss_after_mib"], "MiB"),
    ]
    result.notes.append(f"idle agent CPU {cost['idle_cpu_percent']:.2f} % (subtracted); "
                        "the default --outcomes-interval is 15 s, which adds up to 15 s")
    return result


if __name__ == "__main__":
    sys.exit(0 if not run().skipped else 1)
