"""No dead panel: a real Prometheus (Debian's ``prometheus``) scrapes a running ``mailtls
run`` through a scenario, and every query of the Grafana dashboard (tools/dashboard.py,
the same expressions the chart ships) returns at least one series with a value.

The scenario, on the real kube-apiserver: a Postfix pod of instance ``relay`` (a local
Postfix, its ``mailtls agent`` sidecar a process) with mail deferred because a partner
offers no STARTTLS while its policy says ``encrypt``, TLS sessions under a ``secure``
policy that succeed and fail (datagrams in the format Postfix 3.10 sends, on the agent's
TLSRPT socket: this Postfix is 3.7; real 3.10 sessions are proven end to end in
``test_tlsrpt_outcomes.py``), an audit-mode policy whose probe
fails (a closed port), two policies contesting one key, a break-glass exception, a pod of
instance ``edge`` whose exec rollout fails (this control plane has no kubelet to exec
in: a real failing pod, so the failure series and pods behind exist), a
MailTLSDiscovery whose lookups fail (the operator's nameserver is a closed port), and a
policy whose status writes a ValidatingAdmissionPolicy refuses (the server's own
admission chain, as a cluster's policy engine would).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from testbed import LocalInstance, SmtpSink
from testbed.controlplane import ControlPlane
from testbed.instance import postfix_unavailable
from testbed.layout import InstanceSettings
from testbed.sinks import plain_sink
from testbed.tlsrptworld import datagram

from ...contract.test_dashboard import load_builder
from .conftest import StartOperator
from .helpers import GROUP, VERSION, Cluster, agent_pod, free_port, policy, until

pytestmark = [pytest.mark.cluster, pytest.mark.postfix, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
PROMETHEUS = shutil.which("prometheus")
#: Grafana's $__rate_interval, which Prometheus alone does not know: longer than the run,
#: so every change the scenario made is inside the window.
WINDOW = "5m"
#: What docs/dashboard.png shows: (panel title, unit) of tools/dashboard.PANELS.
PICTURED = ("Table entries per instance", "Pods behind", "Rollout failures",
            "Deferred mail by policy", "TLS sessions by result per policy", "Probes failing",
            "Discovery failing domains", "Policies by Ready reason", "Exceptions in force",
            "API writes")
#: A partner of policy ``tls-partner`` (``secure``): its sessions, reported over TLSRPT.
TLS_PARTNER = "tls.example"


def _tlsrpt_socket(inst: LocalInstance) -> Path:
    """Where the relay pod's agent receives TLSRPT datagrams (``--tlsrpt-socket``)."""
    return inst.root.parent / "tlsrpt.sock"


def _z(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


class Prometheus:
    """A real Prometheus scraping one target every second, its TSDB in a temp dir."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            # honor_labels as the chart's ServiceMonitor (metrics.serviceMonitor.honorLabels):
            # the operator's own ``instance`` label (the Postfix instance) is kept, not
            # renamed exported_instance under the target's host:port
            "scrape_configs": [{"job_name": "mailtls-operator", "honor_labels": True,
                                "static_configs": [{"targets": [target]}]}]}))
        self.log = workdir / "prometheus.log"
        assert PROMETHEUS is not None
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}",
                 f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return self.proc.poll() is not None  # exited: stop waiting, fail below

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/api/v1/query", query=expr)["result"]
        return result

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get(
            "/api/v1/query_range", query=expr, start=str(start), end=str(end),
            step="1")["result"]
        return result

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def finite(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The series whose current value is a number (a histogram quantile over no
    observations is NaN: a series, but a blank panel)."""
    return [s for s in series if math.isfinite(float(s["value"][1]))]


@pytest.fixture
def relay_pod(cluster: Cluster, controlplane: ControlPlane, tmp_path: Path,
              plain: SmtpSink) -> Iterator[LocalInstance]:
    """Pod ``relay-0`` (agent strategy), Running and Ready, whose Postfix is a local
    instance routing ``plain.example`` to a sink without STARTTLS, and whose agent is a
    ``mailtls agent`` process reading its queue every half second and receiving TLSRPT
    datagrams at :func:`_tlsrpt_socket`."""
    reason = postfix_unavailable()
    if reason is not None:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="mailtls-dash-"))
    base.chmod(0o755)  # Postfix daemons (user postfix) must reach into it
    inst = LocalInstance(base / "relay-0", InstanceSettings(
        name="relay-0", routes={"plain.example": f"smtp:{plain.nexthop}"}))
    inst.start()
    try:
        with agent_pod(controlplane, cluster, inst, tmp_path, "--observe-interval", "0.5",
                       "--probe-interval", "0", "--timeout", "5",
                       "--tlsrpt-socket", str(_tlsrpt_socket(inst)),
                       "--outcomes-interval", "0.5"):
            yield inst
    finally:
        inst.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def plain() -> Iterator[SmtpSink]:
    sink = plain_sink()
    sink.start()
    yield sink
    sink.stop()


REFUSED = "status-refused"


@pytest.fixture
def refused_status(cluster: Cluster) -> Iterator[str]:
    """Policy ``status-refused``, whose status writes kube-apiserver refuses through a
    ValidatingAdmissionPolicy bound to the test's namespace (removed at teardown: the
    control plane is shared by the session). Returns once the server refuses them."""
    ns = cluster.ns
    api: Any = kubernetes.client.AdmissionregistrationV1Api(cluster.client)
    name = f"mailtls-test-refuse-status-{ns}"
    api.create_validating_admission_policy({
        "metadata": {"name": name},
        "spec": {"failurePolicy": "Fail", "matchConstraints": {"resourceRules": [
            {"apiGroups": [GROUP], "apiVersions": ["*"], "operations": ["UPDATE"],
             "resources": ["mailtlspolicies/status"]}]},
            "validations": [{"expression": f"object.metadata.name != '{REFUSED}'",
                             "message": "this policy's status is refused (test)"}]}})
    api.create_validating_admission_policy_binding({
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"], "matchResources": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}}})
    cluster.apply(policy(REFUSED, ns, destinations=["refused.example"], level="encrypt"))

    def refused() -> bool:
        try:
            cluster.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, ns, "mailtlspolicies", REFUSED,
                {"status": {"observedGeneration": 0}})
        except kubernetes.client.ApiException as exc:
            return bool(exc.status in (400, 403, 422))
        return False

    try:
        until(refused, 30, "the admission policy refuses the status write")
        yield REFUSED
    finally:
        for delete in (api.delete_validating_admission_policy_binding,
                       api.delete_validating_admission_policy):
            with contextlib.suppress(kubernetes.client.ApiException):
                delete(name)


def _running(cluster: Cluster, name: str) -> None:
    cluster.core.patch_namespaced_pod_status(name, cluster.ns, {"status": {
        "phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
        "conditions": [{"type": "Ready", "status": "True"}]}})


def _scenario(cluster: Cluster, plain: SmtpSink, closed: int) -> None:
    ns = cluster.ns
    now = datetime.now(UTC)
    cluster.create_pod({  # exec strategy (the default) where no kubelet can exec: fails
        "metadata": {"name": "edge-0", "labels": {"mailtls.io/instance": "edge"}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "postfix",
                                                       "image": "postfix"}]}})
    _running(cluster, "edge-0")
    cluster.apply_many([
        policy("plain-partner", ns, destinations=[plain.nexthop], level="encrypt"),
        policy("audit-closed", ns, destinations=[f"[127.0.0.1]:{closed}"], level="encrypt",
               mode="audit"),
        policy("contested-strong", ns, destinations=["contested.example"], level="secure"),
        policy("contested-weak", ns, destinations=["contested.example"], level="may"),
        policy("break-glass", ns, destinations=["broken-tls.example"], level="may",
               exception={"startsAt": _z(now - timedelta(hours=2)),
                          "expiresAt": _z(now + timedelta(days=2)),
                          "reason": "INC-1234 partner certificate expired"}),
        policy("edge-partner", ns, destinations=["edge.example"], level="encrypt",
               instances=["edge"]),
        policy("tls-partner", ns, destinations=[TLS_PARTNER], level="secure",
               instances=["relay"]),
    ])
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "mailtlsdiscoveries", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "MailTLSDiscovery",
        "metadata": {"name": "partners", "namespace": ns},
        "spec": {"domains": ["partner.example", "bank.example"], "instances": ["relay"]}})


def _record(prom: Prometheus, panels: Any, start: float, out: Path) -> None:
    """The pictured panels' series over the run, as JSON and as a PNG."""
    data: dict[str, Any] = {"title": "mailtls-operator: the dashboard test's run, scraped "
                                     "by a real Prometheus every second", "panels": []}
    end = time.time()
    for spec in panels:
        if spec.title not in PICTURED:
            continue
        series = []
        for target in spec.targets:
            for s in prom.query_range(target.expr.replace("$__rate_interval", "30s"),
                                      start, end):
                label = target.legend.replace("{{namespace}}/", "").replace(
                    "{{namespace}} ", "")
                for k, v in s["metric"].items():
                    label = label.replace("{{" + k + "}}", v)
                points = [(float(t) - start, float(v)) for t, v in s["values"]]
                series.append({"label": label.strip(),
                               "t": [p[0] for p in points], "v": [p[1] for p in points]})
        data["panels"].append({"title": spec.title, "unit": spec.unit, "series": series})
    (out / "series.json").write_text(json.dumps(data))
    png = out / "dashboard.png"
    load_builder("dashboard_png").plot(data, png)
    assert png.stat().st_size > 10_000
    target = os.environ.get("MAILTLS_DASHBOARD_PNG")
    if target:
        shutil.copyfile(png, REPO / target)


def test_every_panel_of_the_dashboard_has_data_from_a_real_prometheus(
        cluster: Cluster, start_operator: StartOperator, relay_pod: LocalInstance,
        plain: SmtpSink, refused_status: str, tmp_path: Path) -> None:
    if PROMETHEUS is None:
        pytest.skip("no prometheus binary (make system-deps installs Debian's)")
    panels = load_builder().PANELS
    metrics_port, closed = free_port(), free_port()  # nothing listens on ``closed``
    start_operator("--metrics", f"127.0.0.1:{metrics_port}",
                   "--discovery-nameserver", f"127.0.0.1:{closed}",
                   "--probe-interval", "2")
    prom = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{metrics_port}")
    try:
        until(prom.ready, 30, "Prometheus ready")
        assert prom.proc.poll() is None, prom.log.read_text()[-3000:]
        until(lambda: [s for s in prom.query('up{job="mailtls-operator"}')
                       if s["value"][1] == "1"], 30, "the operator scraped")
        start = time.time()
        _scenario(cluster, plain, closed)
        until(lambda: relay_pod.query(plain.nexthop) == "encrypt", 30,
              what="plain-partner's line installed by the agent")
        relay_pod.submit(["user@plain.example"])
        exprs = {(spec.title, t.expr.replace("$__rate_interval", WINDOW))
                 for spec in panels for t in spec.targets}
        # RolledOut: the agent reported the revision live, and attributes with its table
        until(lambda: (c := cluster.condition("tls-partner", "Ready"))
              and c["reason"] == "RolledOut", 30, what="tls-partner's line live in relay-0")
        until(_tlsrpt_socket(relay_pod).is_socket, 30, what="the agent's TLSRPT socket")
        counted = 'sum(mailtls_tls_sessions_total{policy="tls-partner"})'
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            # two rounds, so that rate() sees each series increase (a counter's first
            # sample is its start): 2 sessions succeed, 1 fails certificate-expired
            for round_ in (1, 2):
                for gram in (datagram(TLS_PARTNER), datagram(TLS_PARTNER),
                             datagram(TLS_PARTNER, 204)):
                    sender.sendto(gram, str(_tlsrpt_socket(relay_pod)))
                until(lambda n=3 * round_: [s for s in prom.query(counted)  # type: ignore[misc]
                                            if float(s["value"][1]) == n], 30,
                      what=f"round {round_} of the TLS sessions scraped")

        seen: dict[tuple[str, str], list[dict[str, Any]]] = {}

        def all_have_data() -> list[tuple[str, str]]:
            for key in exprs - set(seen):
                found = finite(prom.query(key[1]))
                if found:
                    seen[key] = found
            missing = sorted(exprs - set(seen))
            return [] if missing else [("", "")]

        try:
            until(all_have_data, 120, "every panel's query with data", every=1.0)
        except AssertionError:
            missing = "\n".join(f"  {title}: {expr}" for title, expr in sorted(exprs - set(seen)))
            raise AssertionError(f"dead panels (no series with a value):\n{missing}") from None
        for (title, expr), found in sorted(seen.items()):
            print(f"{title}: {expr} -> "
                  + ", ".join(f"{s['metric']}={s['value'][1]}" for s in found))
        # the series name the policies the scenario made them for (others may join:
        # enforced policies are probed too, and their made-up domains do not resolve)
        for title, policy_name in (("Deferred mail by policy", "plain-partner"),
                                   ("TLS sessions by result per policy", "tls-partner"),
                                   ("Probes failing", "audit-closed")):
            expr = next(e for t, e in exprs if t == title)
            until(lambda e=expr, p=policy_name: p in {  # type: ignore[misc]
                s["metric"]["policy"] for s in finite(prom.query(e))}, 30,
                f"{title} names {policy_name}")
        sessions = next(e for t, e in exprs if t == "TLS sessions by result per policy")
        assert {s["metric"]["result"] for s in seen[("TLS sessions by result per policy",
                                                     sessions)]} == {
            "success", "certificate-expired"}
        refused = next(e for t, e in exprs if "status_write_failures" in e)
        assert {s["metric"]["namespace"] for s in seen[("API writes", refused)]} == {
            cluster.ns}
        entries = next(e for t, e in exprs if t == "Table entries per instance")
        until(lambda: {s["metric"]["instance"] for s in prom.query(entries)} == {
            "relay", "edge"}, 30, "table entries of both Postfix instances")

        # the partner's policy relaxed: the agent releases the mail, its series goes
        deferred = next(e for t, e in exprs if t == "Deferred mail by policy")
        cluster.apply(policy("plain-partner", cluster.ns, destinations=[plain.nexthop],
                             level="may"))
        until(lambda: plain.messages, 60, "the deferred mail delivered")
        until(lambda: not prom.query(deferred), 30, "the deferred series gone")
        for title, expr in sorted(exprs):  # what each panel shows at the end of the run
            print(f"{title}: {expr} -> " + ", ".join(
                f"{s['metric']}={float(s['value'][1]):.3g}" for s in prom.query(expr)))
        _record(prom, panels, start, tmp_path)
    finally:
        prom.stop()
