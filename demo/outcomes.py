"""Step 11 of ``make demo``: what really happened to the mail, from Postfix's own TLSRPT
feed (issue 26), shown through kubectl.

A third pod, ``mail/edge-0`` of instance ``edge``: Postfix 3.10 (the test bed's Debian
trixie root, :mod:`testbed.postfixroot`) with ``smtp_tlsrpt_enable = yes``, and its agent
sidecar (the agent strategy): a real ``mailtls agent`` process run as in a pod, with a
token bound to that pod and the CA at the kubelet's path (:mod:`testbed.inpod`).  Postfix
reports a TLS session only to a next-hop domain that publishes a TLSRPT policy, and finds
it through the resolver library, which only speaks to port 53: the pod resolves through
:class:`testbed.tlsrptworld.Port53Dns`, whose two partner domains publish ``_smtp._tls``
TXT records and MX hosts on loopback sinks, one certificate good and one expired.  One
enforced policy covers both; one message to each; then the policy's
``status.outcomes``, its ``TLSFailures`` condition and Event, and the operator's
``mailtls_tls_sessions_total``.

Skipped, saying why, where Postfix 3.10 cannot run (no root built, not root) or port 53
of a loopback address cannot be bound.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from demo.cluster import OperatorProcess, show
from testbed import LocalInstance, postfix_unavailable, starttls_sink
from testbed.controlplane import _stop as stop_group  # TERM, then KILL, the group
from testbed.inpod import in_pod, pod_environment
from testbed.kwokcluster import NODE
from testbed.layout import SBIN_PATH
from testbed.postfixroot import build_for
from testbed.tlsrptworld import (
    SOCKET_NAME,
    Port53Dns,
    postfix_wrappers,
    reporting_instance,
    tlsrpt_record,
)
from testbed.wait import until

if TYPE_CHECKING:
    from collections.abc import Callable

    from demo.__main__ import Demo

NS = "mail"
POD = "edge-0"
INSTANCE = "edge"
POLICY = "suppliers"
GOOD, EXPIRED = "tracking.example.test", "invoices.example.test"
INTERVAL = "1"  # the agent's --outcomes-interval (default 15 s)
SHOWN = ("mail_version", "smtp_tlsrpt_enable", "smtp_tlsrpt_socket_name",
         "smtp_dns_support_level", "smtp_tls_security_level")


def unavailable() -> str | None:
    """Why this step cannot run here, or None."""
    why = postfix_unavailable("3.10")
    return f"no Postfix 3.10 here ({why}); TLSRPT needs Postfix >= 3.10" if why else None


def run(demo: Demo, op: OperatorProcess, step: Callable[[str], None]) -> None:
    """The step: set up, mail, show."""
    step("11. Outcomes, not guesses: a Postfix 3.10 pod reports every TLS session "
         "(TLSRPT) to its agent sidecar")
    why = unavailable()
    if why is None:
        try:
            dns = Port53Dns().start()
        except OSError as exc:
            why = f"a DNS server on port 53 of 127.53.x.y cannot be bound here: {exc}"
    if why is not None:
        print(f"   skipped: {why}")
        return
    with ExitStack() as stack:
        stack.callback(dns.stop)
        edge = Edge(demo, stack, dns)
        edge.start()
        edge.mail()
        edge.show(op)


class Edge:
    """Pod ``mail/edge-0``: its Postfix 3.10 instance, its agent and its partners."""

    def __init__(self, demo: Demo, stack: ExitStack, dns: Port53Dns) -> None:
        self.demo, self.stack, self.dns = demo, stack, dns
        # Outside the demo's directory: the 3.10 root sees the instance's parent at the same
        # path, and must not see the tool wrappers (they would call themselves).
        self.dir = Path(tempfile.mkdtemp(prefix="mailtls-demo-edge-"))
        self.dir.chmod(0o755)
        stack.callback(shutil.rmtree, self.dir, ignore_errors=True)
        stack.callback(build_for("3.10").forget, self.dir)
        self.keys: dict[str, str] = {}

    # ------------------------------------------------------------------ set-up

    def start(self) -> None:
        demo = self.demo
        good = demo.ca_signed
        expired = starttls_sink(demo.base / "certs", name="expired", ca=demo.ca,
                                expired=True).start()
        self.stack.callback(expired.stop)
        routes = {}
        for domain, sink, what in ((GOOD, good, "certificate valid"),
                                   (EXPIRED, expired, "certificate EXPIRED yesterday")):
            self.dns.mail_domain(domain, tlsrpt=tlsrpt_record(domain))
            routes[domain] = f"smtp:{domain}:{sink.port}"
            self.keys[domain] = f"{domain}:{sink.port}"
            print(f"   {domain:22} MX mx.{domain} -> 127.0.0.1:{sink.port} (STARTTLS, "
                  f"sink.mailtls.test from the local CA, {what}); "
                  f'_smtp._tls TXT "{tlsrpt_record(domain)}"')
        print(f"   DNS: {self.dns.address}:53 (the resolver library speaks to port 53 only; "
              "Postfix reports TLSRPT only to domains that publish _smtp._tls)")
        shutil.copy(demo.ca_pem, self.dir / "ca.pem")  # inside what the 3.10 root sees
        inst = self.inst = reporting_instance(self.dir, POD, self.dns, routes, {},
                                              str(self.dir / "ca.pem"))
        self.stack.callback(inst.stop)
        inst.start()
        wrappers = postfix_wrappers(inst, demo.base / "edge-bin")
        assert wrappers is not None  # a 3.10 instance
        cluster = demo.cluster
        # exec in the pod: the 3.10 tools first on PATH (kwok finds `sh` on its own PATH)
        cluster.kwok.map_exec(NS, POD, work_dir=inst.root, containers=("postfix",),
                              env={**inst.env, "PATH": f"{wrappers}:{SBIN_PATH}"})
        cluster.identity(NS, "mailtls-agent")  # the sidecar's ServiceAccount
        manifest = self.pod_manifest(inst)
        print("   the pod, as a user writes it (kwok runs no image: its exec runs the 3.10 "
              "tools, the agent runs beside it as a process):")
        show(yaml.safe_dump(manifest, sort_keys=False, width=100), "     ")
        demo.apply(manifest)
        demo.kubectl("wait", "-n", NS, "--for=condition=Ready", f"pod/{POD}",
                     "--timeout=30s")
        demo.kubectl("get", "pod", POD, "-n", NS, "-o", "wide")
        demo.first_exec(POD)
        demo.kubectl("exec", "-n", NS, POD, "-c", "postfix", "--", "sh", "-c",
                     "postconf " + " ".join(SHOWN))
        token = cluster.plane.service_account_token(NS, "mailtls-agent", pod=POD)
        self.agent = self.start_agent(inst, wrappers, pod_environment(
            cluster.plane, demo.base / "edge-serviceaccount", token))

    def pod_manifest(self, inst: LocalInstance) -> dict[str, Any]:
        """The pod as a user writes it: the instance label, the agent strategy, the table
        the agent writes, and the TLSRPT socket's directory on a volume both containers
        mount at the same path (here: the instance's queue directory on this machine)."""
        socket_dir = str((inst.queue_dir / SOCKET_NAME).parent)

        def mounts() -> list[dict[str, str]]:
            return [{"name": "tlsrpt", "mountPath": socket_dir}]

        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": POD, "namespace": NS,
                             "labels": {"mailtls.io/instance": INSTANCE, "app": "postfix"},
                             "annotations": {"mailtls.io/strategy": "agent",
                                             "mailtls.io/map-path": str(inst.map_path),
                                             "mailtls.io/map-type": inst.settings.map_type}},
                "spec": {"nodeName": NODE, "serviceAccountName": "mailtls-agent",
                         "containers": [
                             {"name": "postfix", "image": "registry.invalid/postfix:3.10",
                              "volumeMounts": mounts()},
                             {"name": "agent", "image": "registry.invalid/mailtls:dev",
                              "command": ["mailtls", "agent"],
                              "args": [f"--instance={INSTANCE}",
                                       f"--outcomes-interval={INTERVAL}"],
                              "volumeMounts": mounts()}],
                         "volumes": [{"name": "tlsrpt", "emptyDir": {}}]}}

    def start_agent(self, inst: LocalInstance, wrappers: Path,
                    pod_env: dict[str, str]) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "mailtls_operator.cli", "agent", "--instance", INSTANCE,
                "--map-path", str(inst.map_path), "--map-type", inst.settings.map_type,
                "--configmap-dir", str(inst.configmap_dir), "--postfix-path", str(wrappers),
                "--observe-interval", "0", "--probe-interval", "0",
                "--outcomes-interval", INTERVAL, "--log-level", "WARNING"]
        env = {**os.environ, **inst.env, **pod_env, "POD_NAME": POD, "POD_NAMESPACE": NS}
        log = self.demo.base / "edge-agent.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(in_pod(argv), env=env, stdin=subprocess.DEVNULL,  # noqa: S603
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # stopped as a group
        self.stack.callback(stop_group, proc)
        print(f"   agent sidecar (pid {proc.pid}): mailtls agent --instance {INSTANCE} "
              f"--outcomes-interval {INTERVAL} ..., as in the pod: a token bound to {POD} "
              "and the CA at /run/secrets/kubernetes.io/serviceaccount, "
              "KUBERNETES_SERVICE_HOST/PORT; it binds the TLSRPT socket "
              f"$queue_directory/{SOCKET_NAME}")
        return proc

    # --------------------------------------------------------------------- mail

    def mail(self) -> None:
        demo = self.demo
        demo.apply(demo.policy(POLICY, destinations=list(self.keys.values()), level="secure",
                               match=["sink.mailtls.test"], instances=[INSTANCE]))
        until(lambda: all(self.inst.query(k) for k in self.keys.values()), 30,
              f"the agent installing {POLICY} in {POD}")
        until(lambda: self.report().get("outcomes", {}).get("socket"), 30,
              f"the agent listening on the TLSRPT socket (log: {demo.base}/edge-agent.log)")
        demo.settled([POLICY], 30)
        demo.kubectl("get", "mailtlspolicy", POLICY, "-n", NS, "-o", "wide")
        print(f"   (the policies without spec.instances, the examples, apply to {INSTANCE} too; "
              f"{POLICY} applies to {INSTANCE} alone)")
        good = demo.send(f"dora@{GOOD}", POD, self.inst)
        demo.evidence(good, "sent", self.inst)
        bad = demo.send(f"erin@{EXPIRED}", POD, self.inst)
        demo.evidence(bad, "deferred", self.inst)

    def report(self) -> dict[str, Any]:
        """The agent's report annotation on its pod (``mailtls.io/agent-report``)."""
        pod = self.demo.request("GET", f"/api/v1/namespaces/{NS}/pods/{POD}")
        text = (pod["metadata"].get("annotations") or {}).get("mailtls.io/agent-report")
        found: dict[str, Any] = json.loads(text) if text else {}
        return found

    # --------------------------------------------------------------------- show

    def show(self, op: OperatorProcess) -> None:
        demo = self.demo

        def counted() -> bool:
            items = demo.status(POLICY).get("outcomes") or []
            return bool(items) and items[0]["succeeded"] + items[0]["failed"] >= 2

        until(counted, 30, f"status.outcomes of {POLICY}")
        until(lambda: demo.condition(POLICY, "TLSFailures"), 30, f"TLSFailures of {POLICY}")
        self.jsonpath("{.status.outcomes}", "outcomes")
        self.jsonpath('{.status.conditions[?(@.type=="TLSFailures")]}', "TLSFailures")
        until(lambda: "CertificateExpired" in demo.kubectl(
            "get", "events", "-n", NS, quiet=True) or None, 20, "the TLSFailures Event")
        demo.kubectl("get", "events", "-n", NS, "--field-selector",
                     f"involvedObject.name={POLICY},type=Warning")
        def series() -> list[str] | None:
            found = op.samples("mailtls_tls_sessions_total")
            return found if len(found) >= 2 else None

        lines = until(series, 30, "mailtls_tls_sessions_total")
        print(f"   $ curl -s 127.0.0.1:{op.metrics}/metrics | grep "
              "mailtls_tls_sessions_total   (the operator's /metrics)")
        show("\n".join(lines), "     ")

    def jsonpath(self, path: str, key: str) -> None:
        print(f"   $ kubectl get mailtlspolicy {POLICY} -n {NS} -o jsonpath='{path}'")
        out = self.demo.kubectl("get", "mailtlspolicy", POLICY, "-n", NS, "-o",
                                f"jsonpath={path}", quiet=True)
        show(yaml.safe_dump({key: json.loads(out)}, sort_keys=False, width=100), "     ")

