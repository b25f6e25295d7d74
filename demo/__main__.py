"""``make demo``: the operator's whole job on this machine, against a real API server.

A real control plane (etcd + kube-apiserver, built by ``make controlplane``) with the
project's CRDs, kwok with one fake node, and two real Postfix instances as the pods
of instance ``mail/relay``: kwok pods whose exec runs locally against those instances,
so every command the operator sends to a pod goes through kube-apiserver's
``pods/exec``.  Three SMTP sinks: one without STARTTLS, one with a self-signed
certificate, one with a certificate from a local CA.  The operator is ``mailtls run``
with a kubeconfig (its own ServiceAccount).  Policies are applied with kubectl, the
table rolls out pod by pod, real mail is deferred and delivered, the evidence is read
back from Postfix's own log and everything is shown through kubectl.  Every process is
stopped at the end, also on Ctrl-C or SIGTERM, and the whole run is bounded in time.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from demo.cluster import BOLD, DIM, RESET, Kubectl, OperatorProcess, locate_binaries, show
from testbed import InstanceSettings, LocalCA, LocalInstance, plain_sink, starttls_sink
from testbed.controlplane import ControlPlaneError
from testbed.kwokcluster import KwokCluster
from testbed.wait import until

GROUP, VERSION, PLURAL = "mailtls.io", "v1alpha1", "mailtlspolicies"
NS = "mail"
REVISION_KEY = "mailtls-revision.invalid"
EXAMPLES = Path(__file__).resolve().parents[1] / "manifests" / "examples" / "policies"
LIMIT_S = 600  # the whole demo, set-up included (a cold build of the binaries is apart)


def step(title: str) -> None:
    print(f"\n{BOLD}== {title}{RESET}", flush=True)


class Demo:
    def __init__(self, stack: ExitStack, base: Path, cluster: KwokCluster) -> None:
        self.stack, self.base, self.cluster = stack, base, cluster
        self.kubectl = Kubectl(cluster.plane)
        self.request = cluster.plane.request  # reads as the admin, plain JSON
        self.pods: dict[str, LocalInstance] = {}
        self.log_seen: dict[Path, int] = {}  # per instance: maillog lines already shown

    # ------------------------------------------------------------------ set-up

    def start_sinks(self) -> None:
        self.ca = ca = LocalCA(self.base / "ca")
        self.ca_pem = str(ca.pem_path)
        self.plain = plain_sink().start()
        self.stack.callback(self.plain.stop)
        self.self_signed = starttls_sink(self.base / "certs", name="self-signed").start()
        self.stack.callback(self.self_signed.stop)
        self.ca_signed = starttls_sink(self.base / "certs", name="ca-signed", ca=ca).start()
        self.stack.callback(self.ca_signed.stop)
        print(f"   plain.example.test      -> {self.plain.nexthop}  (no STARTTLS)")
        print(f"   selfsigned.example.test -> {self.self_signed.nexthop}  (STARTTLS, "
              "self-signed certificate)")
        print(f"   partner.example.test    -> {self.ca_signed.nexthop}  (STARTTLS, certificate "
              f"for sink.mailtls.test from a local CA: {self.ca_pem})")

    def start_pods(self) -> None:
        routes = {"plain.example.test": f"smtp:{self.plain.nexthop}",
                  "selfsigned.example.test": f"smtp:{self.self_signed.nexthop}",
                  "partner.example.test": f"smtp:{self.ca_signed.nexthop}"}
        for i in range(2):
            name = f"relay-{i}"
            inst = LocalInstance(self.base / name, InstanceSettings(name=name, routes=routes))
            inst.create()
            self.stack.callback(inst.stop)
            inst.start()
            self.pods[name] = inst
            self.cluster.postfix_pod(NS, name, inst)
            print(f"   pod {NS}/{name} on node kwok-node-0: exec -> Postfix {inst.root} "
                  f"(smtpd 127.0.0.1:{inst.smtpd_port}), smtp_tls_policy_maps = "
                  f"{inst.tls_policy_map}")
        self.kubectl("get", "pods", "-n", NS, "-o", "wide")
        for name in self.pods:
            self.first_exec(name)
        self.kubectl("exec", "-n", NS, "relay-0", "-c", "postfix", "--", "postconf", "-h",
                     "mail_version", "smtp_tls_policy_maps")

    def first_exec(self, name: str) -> None:
        """kwok learns of a new exec mapping through its watch, about a second after it
        was made: until ``kubectl exec NAME -- true`` succeeds (bounded)."""
        def ok() -> bool:
            done = self.cluster.plane.kubectl("exec", "-n", NS, name, "-c", "postfix", "--",
                                              "true", check=False, timeout=20)
            return done.returncode == 0
        until(ok, 20, f"the first exec in {name}", every=0.2)

    def start_operator(self) -> OperatorProcess:
        ident = self.cluster.identity(NS, "mailtls-operator")
        op = OperatorProcess(ident.kubeconfig, self.base / "operator.log",
                             ["-n", NS, "--debounce", "0.3", "--max-delay", "2",
                              "--probe-interval", "1"])
        print(f"   $ KUBECONFIG={ident.kubeconfig} mailtls run -n {NS} --debounce 0.3 "
              "--max-delay 2 --probe-interval 1")
        op.start()
        self.stack.callback(op.stop)
        print(f"   operator running as {ident.user} (pid {op.proc.pid if op.proc else '?'}; "
              f"/healthz ok on 127.0.0.1:{op.health}; exec strategy through pods/exec)")
        return op

    # ----------------------------------------------------------------- reading

    def policy(self, name: str, **spec: Any) -> dict[str, Any]:
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MailTLSPolicy",
                "metadata": {"name": name, "namespace": NS}, "spec": spec}

    def apply(self, *objs: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs, sort_keys=False))

    def get(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.request(
            "GET", f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}/{name}")
        return obj

    def condition(self, name: str, type_: str = "Ready") -> dict[str, Any] | None:
        return next((c for c in (self.get(name).get("status") or {}).get("conditions", [])
                     if c["type"] == type_), None)

    def rolled_out(self) -> str | None:
        """The ConfigMap's revision once every pod carries it as applied."""
        try:
            cm = self.request("GET", f"/api/v1/namespaces/{NS}/configmaps/relay-mailtls")
        except ControlPlaneError:  # not written yet
            return None
        rev: str | None = (cm["metadata"].get("annotations") or {}).get("mailtls.io/revision")
        for name in self.pods:
            pod = self.request("GET", f"/api/v1/namespaces/{NS}/pods/{name}")
            if (pod["metadata"].get("annotations") or {}).get(
                    "mailtls.io/applied-revision") != rev:
                return None
        return rev

    def settled(self, names: list[str], timeout: float = 60.0) -> None:
        """Until every named policy's status describes its current generation, none is
        Pending, and every pod has the ConfigMap's revision."""
        def done() -> bool:
            for name in names:
                obj = self.get(name)
                status = obj.get("status") or {}
                ready = next((c for c in status.get("conditions", [])
                              if c["type"] == "Ready"), None)
                if status.get("observedGeneration") != obj["metadata"].get("generation") or \
                        ready is None or ready["reason"] == "Pending":
                    return False
            return self.rolled_out() is not None
        until(done, timeout, "every policy's status and the rollout", every=0.2)

    def status(self, name: str) -> dict[str, Any]:
        status: dict[str, Any] = self.get(name).get("status") or {}
        return status

    def deferred(self, name: str) -> dict[str, Any] | None:
        d = self.status(name).get("deferred") or {}
        return d if d.get("recipients") else None

    def print_probes(self, names: list[str]) -> None:
        rows = [("POLICY", "MODE", "DESTINATION", "RESULT", "REASON")]
        for name in names:
            obj = self.get(name)
            for p in (obj.get("status") or {}).get("probes") or []:
                rows.append((name, obj["spec"].get("mode", "enforce"), p["destination"],
                             p["result"], f"{p['reason']}: {p['message'][:70]}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            show("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])

    # --------------------------------------------------------------------- mail

    def send(self, rcpt: str, pod: str = "relay-0", inst: LocalInstance | None = None) -> str:
        qid = (inst or self.pods[pod]).submit([rcpt])
        print(f"   {pod} accepted mail for {rcpt} (queue id {qid})")
        return qid

    def evidence(self, qid: str, status: str | tuple[str, ...],
                 inst: LocalInstance | None = None) -> None:
        """The delivery's lines of the pod's maillog (relay-0's unless ``inst``): the TLS
        handshake, Postfix's own TLSRPT verdict where it reports one, the status."""
        inst = inst or self.pods["relay-0"]
        delivery = inst.wait_for_delivery(qid, status=status, timeout=30)
        port = delivery.relay.rsplit(":", 1)[-1]
        lines = inst.maillog().splitlines()
        for line in lines[self.log_seen.get(inst.root, 0):]:  # what this delivery logged
            if ("TLS connection established" in line and f"]:{port}:" in line) or \
                    "TLSRPT: " in line or (qid in line and "status=" in line):
                show(f"{DIM}{line.split(': ', 1)[-1]}{RESET}", "     maillog: ")
        self.log_seen[inst.root] = len(lines)
        print(f"   => {delivery.status.upper()}: {delivery.reason[:120]}")


def run(base: Path) -> None:
    started = time.monotonic()
    with ExitStack() as stack:
        step("1. A real API server: etcd + kube-apiserver + kwok (fake node, exec mapped to "
             "local Postfix)")
        binaries = locate_binaries()
        cluster = KwokCluster(base / "cluster", binaries=binaries)
        stack.callback(cluster.stop)
        cluster.start()
        print(f"   kube-apiserver {cluster.git_version()} at {cluster.url} (its /version), "
              f"etcd {cluster.plane.etcd_url}; ready with the CRDs and kwok in "
              f"{cluster.started_in:.1f} s")
        demo = Demo(stack, base, cluster)
        demo.kubectl("version", "-o", "json", quiet=True)
        demo.kubectl("get", "crd", "-o", "custom-columns=CRD:.metadata.name,"
                     "ESTABLISHED:.status.conditions[?(@.type=='Established')].status")
        demo.kubectl("get", "nodes")

        step("2. SMTP sinks, two Postfix pods (kwok pods whose exec is a local Postfix), "
             "the operator")
        cluster.namespace(NS)
        demo.start_sinks()
        demo.start_pods()
        op = demo.start_operator()

        step("3. Apply the example policies (manifests/examples/policies) and four "
             "policies for the sinks")
        demo.kubectl("apply", "-f", str(EXAMPLES))
        examples = [d["metadata"]["name"] for f in sorted(EXAMPLES.glob("*.yaml"))
                    for d in yaml.safe_load_all(f.read_text()) if d]
        mine = [
            demo.policy("plain-partner", destinations=[demo.plain.nexthop], level="encrypt"),
            demo.policy("selfsigned-partner", destinations=[demo.self_signed.nexthop],
                        level="encrypt"),
            demo.policy("ca-partner", destinations=[demo.ca_signed.nexthop], level="secure",
                        match=["sink.mailtls.test"], tafile=[demo.ca_pem]),
            demo.policy("selfsigned-secure-audit", destinations=[demo.self_signed.nexthop],
                        level="secure", match=["sink.mailtls.test"], mode="audit"),
        ]
        demo.apply(*mine)
        names = examples + [o["metadata"]["name"] for o in mine]
        demo.settled(names)
        print(f"   the operator's /metrics: mailtls_table_entries "
              f"{op.metric('mailtls_table_entries'):.0f}, mailtls_configmap_writes_total "
              f"{op.metric('mailtls_configmap_writes_total'):.0f}, rollouts "
              f"{op.metric('mailtls_rollout_duration_seconds_count'):.0f}")

        step("4. The rendered table: ConfigMap mail/relay-mailtls, rolled out through "
             "pods/exec")
        demo.kubectl("get", "configmap", "relay-mailtls", "-n", NS, "-o", "yaml", head=40)
        for name, inst in demo.pods.items():
            demo.kubectl("exec", "-n", NS, name, "-c", "postfix", "--", "postmap", "-q",
                         REVISION_KEY, inst.tls_policy_map)
        demo.kubectl("get", "pods", "-n", NS, "-o",
                     "custom-columns=POD:.metadata.name,APPLIED:.metadata.annotations."
                     "mailtls\\.io/applied-revision")

        step("5. Status, as kubectl shows it (the CRD's printer columns)")
        demo.kubectl("get", "mailtlspolicies", "-n", NS, "-o", "wide")
        print("   why the others are not Ready (status.conditions[Ready].message):")
        for name in names:
            cond = demo.condition(name) or {}
            if cond.get("status") != "True":
                print(f"     {name}: {cond.get('reason')}: {cond.get('message', '')[:150]}")

        step("6. Real mail through relay-0")
        q_plain = demo.send("alice@plain.example.test")
        demo.evidence(q_plain, "deferred")
        q_self = demo.send("bob@selfsigned.example.test")
        demo.evidence(q_self, "sent")
        q_ca = demo.send("carol@partner.example.test")
        demo.evidence(q_ca, "sent")

        step("7. Stuck mail, seen: status.deferred of plain-partner (from postqueue -j, "
             "run through pods/exec)")
        until(lambda: demo.deferred("plain-partner"), 30, "status.deferred of plain-partner")
        out = demo.kubectl("get", "mailtlspolicy", "plain-partner", "-n", NS, "-o",
                           "jsonpath={.status.deferred}", quiet=True)
        print(f"   $ kubectl get mailtlspolicy plain-partner -n {NS} -o "
              "jsonpath='{.status.deferred}'")
        show(yaml.safe_dump({"deferred": json.loads(out)}, sort_keys=False, width=100), "     ")

        step("8. Preflight probes (posttls-finger in pod relay-0, through pods/exec): "
             "status.probes")
        until(lambda: demo.status("selfsigned-secure-audit").get("probes"), 30,
              "the audit policy's probes")
        demo.print_probes(["selfsigned-secure-audit", "candidate-secure", "ca-partner",
                           "selfsigned-partner", "plain-partner"])

        step("9. Fix: the plain partner cannot do TLS, relax it to 'may'; the operator "
             "releases the stuck mail")
        fixed_at = time.monotonic()
        demo.apply(demo.policy("plain-partner", destinations=[demo.plain.nexthop],
                               level="may"))
        demo.plain.wait_for(1, 30)
        took = time.monotonic() - fixed_at
        demo.evidence(q_plain, "sent")
        retry = demo.pods["relay-0"].postconf("minimal_backoff_time", "queue_run_delay")
        print(f"   the deferred message reached the sink {took:.2f}s after kubectl apply "
              f"(rollout to 2 pods through pods/exec + postqueue -i); Postfix's own retry "
              f"would have waited up to minimal_backoff_time="
              f"{retry['minimal_backoff_time']}, queue_run_delay={retry['queue_run_delay']}")

        step("10. Break-glass: a temporary 'may' exception over the secure ca-partner")
        now = datetime.now(UTC).replace(microsecond=0)
        demo.apply(demo.policy(
            "ca-partner-break-glass", destinations=[demo.ca_signed.nexthop], level="may",
            exception={"startsAt": now.isoformat().replace("+00:00", "Z"),
                       "expiresAt": (now + timedelta(hours=4)).isoformat()
                       .replace("+00:00", "Z"),
                       "reason": "INC-4711 partner certificate expired overnight"}))
        names.append("ca-partner-break-glass")
        demo.settled(names)
        demo.kubectl("exec", "-n", NS, "relay-0", "-c", "postfix", "--", "postmap", "-q",
                     demo.ca_signed.nexthop, demo.pods["relay-0"].tls_policy_map)
        for name, ctype in (("ca-partner", "Overridden"),
                            ("ca-partner-break-glass", "BreakGlass")):
            cond = demo.condition(name, ctype) or {}
            print(f"   {name}: {ctype}={cond.get('status')} ({cond.get('reason')}): "
                  f"{cond.get('message')}")
        until(lambda: "BreakGlass" in demo.kubectl(
            "get", "events", "-n", NS, quiet=True) or None, 20, "the BreakGlass event")
        described = demo.kubectl("describe", "mailtlspolicy", "ca-partner-break-glass",
                                 "-n", NS, quiet=True)
        print(f"   $ kubectl describe mailtlspolicy ca-partner-break-glass -n {NS}   "
              "(its Events)")
        show(described[described.find("Events:"):] if "Events:" in described
             else described[-800:], "     ")
        demo.kubectl("get", "events", "-n", NS, "--field-selector",
                     "involvedObject.kind=MailTLSPolicy", "--sort-by=.lastTimestamp")

        from demo.outcomes import run as outcomes  # issue 26: Postfix 3.10's TLSRPT

        outcomes(demo, op, step)

        step("12. Final status")
        demo.kubectl("get", "mailtlspolicies", "-n", NS)
        from demo.discovery import run as discovery  # issue 16: no API server involved

        asyncio.run(discovery(base, step))
        code = op.stop()
        print(f"\n   mailtls run stopped (exit {code}); stopping kwok, kube-apiserver, etcd, "
              "Postfix and the sinks.")
    print(f"\n{BOLD}Demo finished in {time.monotonic() - started:.1f}s; everything it "
          f"started is stopped.{RESET}")


def _stop_on(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM (and the time limit) unwind like Ctrl-C: every process is stopped."""
    if signum == signal.SIGALRM:
        raise TimeoutError(f"the demo did not finish within {LIMIT_S} s")
    raise SystemExit(128 + signum)


def main() -> int:
    signal.signal(signal.SIGTERM, _stop_on)
    signal.signal(signal.SIGALRM, _stop_on)
    signal.alarm(LIMIT_S)
    base = Path(tempfile.mkdtemp(prefix="mailtls-demo-"))
    base.chmod(0o755)  # Postfix daemons (user postfix) must reach into it
    try:
        run(base)
    except KeyboardInterrupt:
        print("\ninterrupted: everything the demo started is stopped.", file=sys.stderr)
        return 130
    except SystemExit:
        print("\nterminated: everything the demo started is stopped.", file=sys.stderr)
        raise
    finally:
        signal.alarm(0)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
