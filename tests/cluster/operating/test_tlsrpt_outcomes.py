"""TLS outcomes end to end (issue 26): real Postfix 3.10 sessions -> its agent -> the real
kube-apiserver -> ``status.outcomes``, ``TLSFailures`` and ``mailtls_tls_sessions_total``.

A local Postfix 3.10 instance (``smtp_tlsrpt_enable = yes``) delivers to loopback sinks
through the port-53 DNS server of :mod:`testbed.tlsrptworld`, whose domains publish
``_smtp._tls`` records.  Its pod is an API object marked Running; its agent is a real
``mailtls agent`` process with a pod-bound token, which runs the 3.10 tools through
wrappers (:func:`testbed.tlsrptworld.postfix_wrappers`) and binds the TLSRPT socket
where main.cf says.  ``mailtls run`` is a subprocess against the real server.  Proven:

- each failure class lands in its own policy's ``status.outcomes`` with its RFC 8460
  type, as ``TLSFailures=True`` with that type as the reason, as a Warning Event and as
  the counter's series: no STARTTLS under ``encrypt``, a self-signed certificate under
  ``secure``, a name mismatch, an expired certificate; success too; an audit policy's
  verdict says what was observed; a policy without traffic gets nothing;
- a hostile stream on the socket (garbage, a datagram past the size limit, a flood)
  leaves the agent's memory bounded, and it goes on counting real sessions.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from testbed import LocalInstance, stop_all
from testbed.controlplane import ControlPlane
from testbed.tlsrptworld import postfix_wrappers
from tests.postfix.tlsrpt_helpers import SOCKET_NAME, World, instance, record, send_all
from tests.postfix.tlsrpt_helpers import tlsrpt_world as tlsrpt_world  # the fixture

from .conftest import StartOperator
from .helpers import Cluster, agent_pod, free_port, policy, until

pytestmark = [pytest.mark.cluster, pytest.mark.postfix]

# recipient domain -> (sink, the policy's spec, the result Postfix reports)
CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "nostarttls.test": ("plain", {"level": "encrypt"}, "starttls-not-supported"),
    "selfsigned.test": ("self-signed", {"level": "secure"}, "validation-failure"),
    "mismatch.test": ("ca-signed", {"level": "secure", "match": ["other.name"]},
                      "certificate-host-mismatch"),
    "expired.test": ("expired", {"level": "secure", "match": ["sink.mailtls.test"]},
                     "certificate-expired"),
    "secure.test": ("ca-signed", {"level": "secure", "match": ["sink.mailtls.test"]},
                    "success"),
}
AUDITED = "audited.test"  # an audit policy's destination: mail runs under the global `may`
IDLE = "idle.test"  # a policy without mail
REASONS = {"starttls-not-supported": "StartTLSNotSupported",
           "validation-failure": "ValidationFailure",
           "certificate-host-mismatch": "CertificateHostMismatch",
           "certificate-expired": "CertificateExpired"}


def _name(domain: str) -> str:
    return "p-" + domain.split(".")[0]


@dataclass
class ReportingPod:
    """Pod ``relay-0``: a Postfix 3.10 instance reporting TLSRPT, and its agent process."""

    inst: LocalInstance
    agent: subprocess.Popen[bytes]
    log: Path
    keys: dict[str, str]  # recipient domain -> its policy key (domain:port)

    def report(self, cluster: Cluster) -> dict[str, Any]:
        pod = cluster.core.read_namespaced_pod("relay-0", cluster.ns)
        text = (pod.metadata.annotations or {}).get("mailtls.io/agent-report")
        return json.loads(text) if text else {}

    def outcomes(self, cluster: Cluster) -> dict[str, Any]:
        return self.report(cluster).get("outcomes") or {}

    def rss_kib(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.agent.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} for the agent")


@pytest.fixture
def reporting_pod(tlsrpt_world: World, cluster: Cluster, controlplane: ControlPlane,
                  tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ReportingPod]:
    base, dns, sinks = tlsrpt_world
    routes, keys = {}, {}
    for domain in [*CASES, AUDITED, IDLE]:
        sink = sinks[CASES[domain][0] if domain in CASES else "ca-signed"]
        dns.mail_domain(domain, tlsrpt=record(domain))
        routes[domain] = f"smtp:{domain}:{sink.port}"
        keys[domain] = f"{domain}:{sink.port}"
    inst = instance(base, f"relay-{cluster.ns}", dns, routes, {})
    inst.start()
    wrappers = postfix_wrappers(inst, tmp_path / "bin")
    try:
        with agent_pod(controlplane, cluster, inst, tmp_path,
                       "--observe-interval", "0", "--probe-interval", "0",
                       "--outcomes-interval", "0.5",
                       *(["--postfix-path", str(wrappers)] if wrappers else [])) as agent:
            yield ReportingPod(inst, agent.proc, agent.log, keys)
    finally:
        failed = getattr(request.node, "rep_call", None)
        log = tmp_path / "agent.log"
        if failed is not None and failed.failed and log.exists():
            print(f"--- agent log ---\n{log.read_text(errors='replace')[-6000:]}")
        assert not stop_all([inst])
        shutil.rmtree(inst.root, ignore_errors=True)
        assert not (inst.queue_dir / SOCKET_NAME).exists(), "the agent left its socket"


def _spec(domain: str, pod: ReportingPod, **extra: Any) -> dict[str, Any]:
    level_spec = CASES[domain][1] if domain in CASES else {"level": "secure",
                                                           "match": ["sink.mailtls.test"]}
    return {"destinations": [pod.keys[domain]], **level_spec, **extra}


def _installed(pod: ReportingPod, cluster: Cluster, domains: list[str]) -> None:
    until(lambda: all(pod.inst.query(pod.keys[d]) for d in domains), 60,
          what="the policies installed in Postfix by the agent")
    until(lambda: pod.outcomes(cluster).get("socket"), 30,
          what=f"the agent receiving TLSRPT datagrams: {pod.report(cluster)}")


def _outcome(cluster: Cluster, name: str) -> dict[str, Any] | None:
    items = cluster.status(name).get("outcomes") or []
    return items[0] if items else None


def _sessions(metrics_port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.labels["policy"], s.labels["result"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "mailtls_tls_sessions_total"}


def test_each_failure_class_and_success_reach_their_policies_status_and_metrics(
        cluster: Cluster, start_operator: StartOperator, reporting_pod: ReportingPod) -> None:
    ns, pod = cluster.ns, reporting_pod
    metrics_port = free_port()
    start_operator("--metrics", f"127.0.0.1:{metrics_port}", "--probe-scope", "audit")
    for domain in [*CASES, IDLE]:
        cluster.apply(policy(_name(domain), ns, **_spec(domain, pod)))
    cluster.apply(policy(_name(AUDITED), ns, **_spec(AUDITED, pod, mode="audit")))
    _installed(pod, cluster, [*CASES, IDLE])

    deliveries = send_all(pod.inst, [*CASES, AUDITED])
    for domain, (_, _, result) in CASES.items():
        assert (deliveries[domain].status == "sent") == (result == "success"), \
            deliveries[domain]

    for domain, (_, _, result) in CASES.items():
        name = _name(domain)
        found = until(partial(_outcome, cluster, name), 30, what=f"status.outcomes of {name}")
        assert found["instance"] == "relay" and found["windowSeconds"] == 3600
        if result == "success":
            assert (found["succeeded"], found["failed"], found["failures"]) == (1, 0, [])
            assert "lastFailure" not in found and found["lastSuccess"]
            cond = cluster.has(name, "TLSFailures")
            assert (cond["status"], cond["reason"]) == ("False", "NoLastingFailures"), cond
            continue
        assert (found["succeeded"], found["failed"]) == (0, 1), found
        assert found["failures"] == [{"type": result, "sessions": 1}]
        last = found["lastFailure"]
        assert (last["type"], last["key"]) == (result, pod.keys[domain])
        assert f"at mx.{domain}[127.0.0.1]" in last["detail"]
        cond = until(partial(cluster.condition, name, "TLSFailures"), 30,
                     what=f"TLSFailures of {name}")
        assert (cond["status"], cond["reason"]) == ("True", REASONS[result]), cond
        assert cond["message"].startswith(f"{result}: 1 of 1 session(s) to {pod.keys[domain]}")
    detail = _outcome(cluster, "p-selfsigned")["lastFailure"]["detail"]  # type: ignore[index]
    assert detail.startswith("validation-failure (self-signed_certificate)")

    # the audit policy: nothing written, its destination's own mail observed
    audited = until(lambda: _outcome(cluster, "p-audited"), 30, what="audit outcomes")
    assert (audited["succeeded"], audited["failed"]) == (1, 0)
    verified = until(lambda: (c := cluster.condition("p-audited", "Verified"))
                     and "observed" in c["message"] and c, 60, what="the audit verdict")
    assert "observed under the policy in force: 1 TLS session(s) from relay in the last " \
           "1h, 0 failed" in verified["message"]
    assert cluster.condition("p-audited", "TLSFailures") is None  # not enforced
    # no traffic, nothing
    idle = cluster.status("p-idle")
    assert "outcomes" not in idle and cluster.condition("p-idle", "TLSFailures") is None

    events = set(cluster.policy_events())
    for domain, (_, _, result) in CASES.items():
        if result != "success":
            assert (REASONS[result], _name(domain)) in events, events
    sessions = until(lambda: (s := _sessions(metrics_port)) and len(s) >= len(CASES) and s,
                     30, what="the sessions counter")
    assert sessions == {(_name(d), result): 1.0 for d, (_, _, result) in CASES.items()}


def _hostile_datagrams() -> Iterator[bytes]:
    rng = random.Random(26)
    for size in range(1, 4000, 7):  # random bytes
        yield rng.randbytes(size)
    yield from (b"{", b"null", b"[]", b'{"d": 5}', b'{"policies": 5}', b'\xff\xfe{}',
                b'{"d":"a.test","pr":"x","policies":[{"policy-type":9,"t":true,"f":0}]}',
                b'{"d":"a.test","pr":"x","policies":[{"f":NaN}]}', b"[" * 60000,
                b'{"d":"' + b"a" * 60000 + b'"}', b'{"d":"x","n":' + b"9" * 5000 + b"}",
                json.dumps({"d": "a.test", "pr": "x", "policies": [
                    {"policy-type": 9, "t": 0, "f": 0}] * 100}).encode())


def _flood(domain: str = "flood.test") -> bytes:
    return json.dumps({"d": domain, "pr": record(domain), "policies": [
        {"policy-type": 9, "policy-domain": domain, "t": 0, "f": 0}]}).encode()


def test_a_hostile_datagram_stream_leaves_the_agent_bounded_and_counting(
        cluster: Cluster, start_operator: StartOperator, reporting_pod: ReportingPod) -> None:
    ns, pod = cluster.ns, reporting_pod
    start_operator("--probe-scope", "audit")
    cluster.apply(policy("p-secure", ns, **_spec("secure.test", pod)))
    _installed(pod, cluster, ["secure.test"])
    assert send_all(pod.inst, ["secure.test"])["secure.test"].status == "sent"
    until(lambda: (o := _outcome(cluster, "p-secure")) and o["succeeded"] == 1, 30,
          what="the first session counted")
    rss_before, hwm_before = pod.rss_kib(), pod.rss_kib("VmHWM")

    path = str(pod.inst.queue_dir / SOCKET_NAME)
    garbage = sent = dropped = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sender.settimeout(10)  # garbage: every datagram delivered, waiting when the queue
        for gram in _hostile_datagrams():  # (net.unix.max_dgram_qlen of them) is full
            sender.sendto(gram, path)
            garbage += 1
        with contextlib.suppress(OSError):  # over the size limit (if the kernel takes it)
            sender.sendto(b"{" + b" " * 200_000 + b"}", path)
            garbage += 1
        sender.setblocking(False)  # the flood: as fast as one core sends, like libtlsrpt
        flood, started = _flood(), time.monotonic()
        while time.monotonic() - started < 3.0:
            try:
                sender.sendto(flood, path)
                sent += 1
            except BlockingIOError:  # the agent's queue is full: libtlsrpt drops the same
                dropped += 1
    assert pod.agent.poll() is None, "the agent died"

    def drained() -> dict[str, Any] | None:  # the flood read: the unmatched count settles
        first = pod.outcomes(cluster)
        time.sleep(1.5)
        second = pod.outcomes(cluster)
        return second if first == second and second.get("throttled") else None

    report = until(drained, 60, what="the flood drained", every=0.1)
    rss_after, hwm_after = pod.rss_kib(), pod.rss_kib("VmHWM")
    print(f"\nhostile stream: {garbage} garbage datagrams; flood: {sent} taken by the "
          f"socket, {dropped} refused by the full queue; agent refused {report['refused']}, "
          f"paused {report['throttled']} times; RSS {rss_before} -> {rss_after} KiB, peak "
          f"{hwm_before} -> {hwm_after} KiB")
    assert report["refused"] == garbage and report["throttled"] >= 1
    assert rss_after - rss_before < 16 * 1024 and hwm_after - hwm_before < 16 * 1024
    unmatched = next(k for k in report["keys"] if k["key"] == "(no policy key)")
    assert 0 < unmatched["total"]["success"] <= sent

    # and it keeps counting real sessions, into the status
    assert send_all(pod.inst, ["secure.test"])["secure.test"].status == "sent"
    until(lambda: (o := _outcome(cluster, "p-secure")) and o["succeeded"] == 2, 30,
          what="the session after the flood counted")
    assert pod.agent.poll() is None
