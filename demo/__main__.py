"""``make demo``: the operator's whole job on this machine, with no cluster.

A Kubernetes API emulation (kmock, with our CRD enforced) on loopback, the real
operator (Kopf + the official client), two real Postfix instances as the pods of
instance ``mail/relay`` (commands run by the local PodRunner, the same argv as in
a pod), and three SMTP sinks: one without STARTTLS, one with a self-signed
certificate, one with a certificate from a local CA.  Policies are applied,
the table rolls out pod by pod, real mail is deferred and delivered, and the
evidence is read back from Postfix's own log.  Everything is stopped at the end.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kmock
import kopf
import kubernetes.client
import yaml

from mailtls_operator.controller import Config, Operator, build_registry
from mailtls_operator.kube import Kube
from mailtls_operator.podrunner import PodRef
from testbed import (
    InstanceSettings,
    LocalCA,
    LocalInstance,
    LocalPodRunner,
    plain_sink,
    starttls_sink,
)
from testbed.apiserver import ApiServer, run_operator

GROUP, VERSION, PLURAL = "mailtls.io", "v1alpha1", "mailtlspolicies"
EXAMPLES = Path(__file__).resolve().parents[1] / "manifests" / "examples" / "policies"
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def step(title: str) -> None:
    print(f"\n{BOLD}== {title}{RESET}", flush=True)


def show(text: str, indent: str = "   ") -> None:
    for line in text.rstrip("\n").splitlines():
        print(f"{indent}{line}", flush=True)


class Demo:
    def __init__(self, stack: AsyncExitStack, base: Path) -> None:
        self.stack = stack
        self.base = base
        self.runner = LocalPodRunner()
        self.pods: dict[str, LocalInstance] = {}
        self.log_seen = 0

    # ------------------------------------------------------------------ set-up

    async def start_apiserver(self) -> None:
        self.server = ApiServer()
        await self.stack.enter_async_context(self.server)
        await self.stack.enter_async_context(kmock.Server(self.server))
        self.stack.push_async_callback(self.server.close_streams)
        cfg = kubernetes.client.Configuration()
        cfg.host = str(self.server.url).rstrip("/")
        self.client = self.stack.enter_context(kubernetes.client.ApiClient(cfg))
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self.core = kubernetes.client.CoreV1Api(self.client)
        print(f"   Kubernetes API emulation on {cfg.host} (CRD mailtlspolicies.mailtls.io "
              "installed and enforced)")

    def start_sinks(self) -> None:
        ca = LocalCA(self.base / "ca")
        self.ca_pem = str(ca.pem_path)
        self.plain = plain_sink().start()
        self.self_signed = starttls_sink(self.base / "certs", name="self-signed").start()
        self.ca_signed = starttls_sink(self.base / "certs", name="ca-signed", ca=ca).start()
        for sink in (self.plain, self.self_signed, self.ca_signed):
            self.stack.callback(sink.stop)
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
            self.runner.add(PodRef("mail", name), inst)
            self.server.seed("v1/pods", {
                "metadata": {"name": name, "namespace": "mail",
                             "labels": {"mailtls.io/instance": "relay"},
                             "annotations": {"mailtls.io/map-path": str(inst.map_path),
                                             "mailtls.io/map-type": "lmdb"}},
                "spec": {"containers": [{"name": "postfix", "image": "debian-postfix"}]},
                "status": {"phase": "Running",
                           "conditions": [{"type": "Ready", "status": "True"}]}})
            print(f"   pod mail/{name}: Postfix {inst.root} (smtpd 127.0.0.1:{inst.smtpd_port}),"
                  f" smtp_tls_policy_maps = {inst.tls_policy_map}")

    async def start_operator(self) -> None:
        self.operator = Operator(Kube(self.client), self.runner,
                                 Config(debounce=0.3, max_delay=2.0, retry_base=1.0,
                                        observe_interval=1.0))
        await self.stack.enter_async_context(run_operator(
            self.server, build_registry(), memo=kopf.Memo(operator=self.operator)))
        print("   operator running (Kopf, official kubernetes client, exec strategy)")

    # ----------------------------------------------------------------- kubectl

    async def apply(self, obj: dict[str, Any]) -> None:
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        if self.server.get_object(PLURAL, ns, name) is None:
            await asyncio.to_thread(self.custom.create_namespaced_custom_object, GROUP, VERSION,
                                    ns, PLURAL, obj)
        else:
            await asyncio.to_thread(
                self.custom.patch_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, name,
                [{"op": "replace", "path": "/spec", "value": obj["spec"]}],
                _content_type="application/json-patch+json")
        print(f"   mailtlspolicy.mailtls.io/{name} applied: {obj['spec']['level']} "
              f"{', '.join(obj['spec']['destinations'])}")

    def policy(self, name: str, **spec: Any) -> dict[str, Any]:
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MailTLSPolicy",
                "metadata": {"name": name, "namespace": "mail"}, "spec": spec}

    def condition(self, name: str, type_: str = "Ready") -> dict[str, Any] | None:
        obj = self.server.get_object(PLURAL, "mail", name) or {}
        return next((c for c in (obj.get("status") or {}).get("conditions", [])
                     if c["type"] == type_), None)

    async def settled(self, names: list[str], timeout: float = 30.0) -> None:
        """Until every named policy's status describes its current generation and no
        rollout is pending."""
        def done() -> bool:
            for name in names:
                obj = self.server.get_object(PLURAL, "mail", name) or {}
                status = obj.get("status") or {}
                cond = self.condition(name)
                if status.get("observedGeneration") != obj["metadata"].get("generation") or \
                        cond is None or cond["reason"] == "Pending":
                    return False
            return self.operator.idle
        await self.server.wait_until(done, timeout)

    def status(self, name: str) -> dict[str, Any]:
        obj = self.server.get_object(PLURAL, "mail", name) or {}
        status: dict[str, Any] = obj.get("status") or {}
        return status

    def deferred(self, name: str) -> dict[str, Any] | None:
        d = self.status(name).get("deferred") or {}
        return d if d.get("recipients") else None

    def probes(self, name: str) -> list[dict[str, Any]]:
        probes: list[dict[str, Any]] = self.status(name).get("probes") or []
        return probes

    def print_probes(self, names: list[str]) -> None:
        rows = [("POLICY", "MODE", "DESTINATION", "RESULT", "REASON")]
        for name in names:
            obj = self.server.get_object(PLURAL, "mail", name) or {}
            for p in self.probes(name):
                rows.append((name, obj["spec"].get("mode", "enforce"), p["destination"],
                             p["result"], f"{p['reason']}: {p['message'][:70]}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            show("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])

    def print_policies(self) -> None:
        rows = [("NAME", "LEVEL", "READY", "REASON", "MESSAGE")]
        for obj in sorted(self.server.list_objects(PLURAL, "mail"),
                          key=lambda o: o["metadata"]["name"]):
            name = obj["metadata"]["name"]
            ready = self.condition(name) or {}
            accepted = self.condition(name, "Accepted") or {}
            reason = ready.get("reason", "")
            if accepted.get("status") == "False":
                reason = f"{reason}/{accepted.get('reason')}"
            message = ready.get("message", "")
            if accepted.get("status") == "False":
                message = accepted.get("message", "")
            rows.append((name, obj["spec"]["level"], ready.get("status", "?"), reason,
                         message[:90] + ("..." if len(message) > 90 else "")))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            show("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])

    # --------------------------------------------------------------------- mail

    def send(self, rcpt: str) -> str:
        qid = self.pods["relay-0"].submit([rcpt])
        print(f"   relay-0 accepted mail for {rcpt} (queue id {qid})")
        return qid

    def evidence(self, qid: str, status: str | tuple[str, ...]) -> None:
        inst = self.pods["relay-0"]
        delivery = inst.wait_for_delivery(qid, status=status, timeout=20)
        port = delivery.relay.rsplit(":", 1)[-1]
        lines = inst.maillog().splitlines()
        for line in lines[self.log_seen:]:  # only what this delivery logged
            if ("TLS connection established" in line and f"]:{port}:" in line) or \
                    (qid in line and "status=" in line):
                show(f"{DIM}{line.split(': ', 1)[-1]}{RESET}", "     maillog: ")
        self.log_seen = len(lines)
        print(f"   => {delivery.status.upper()}: {delivery.reason[:120]}")


async def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="   [operator] %(message)s",
                        stream=sys.stdout)
    logging.getLogger("mailtls.controller").setLevel(logging.INFO)
    base = Path(tempfile.mkdtemp(prefix="mailtls-demo-"))
    base.chmod(0o755)
    started = time.monotonic()
    try:
        async with AsyncExitStack() as stack:
            demo = Demo(stack, base)
            step("1. A Kubernetes API (emulated), SMTP sinks, two Postfix pods, the operator")
            await demo.start_apiserver()
            demo.start_sinks()
            demo.start_pods()
            await demo.start_operator()

            step("2. Apply the example policies (manifests/examples/policies) and three "
                 "policies for the sinks")
            examples = [d for f in sorted(EXAMPLES.glob("*.yaml"))
                        for d in yaml.safe_load_all(f.read_text()) if d]
            for obj in examples:
                await demo.apply(obj)
            mine = [
                demo.policy("plain-partner", destinations=[demo.plain.nexthop],
                            level="encrypt"),
                demo.policy("selfsigned-partner", destinations=[demo.self_signed.nexthop],
                            level="encrypt"),
                demo.policy("ca-partner", destinations=[demo.ca_signed.nexthop], level="secure",
                            match=["sink.mailtls.test"], tafile=[demo.ca_pem]),
                demo.policy("selfsigned-secure-audit", destinations=[demo.self_signed.nexthop],
                            level="secure", match=["sink.mailtls.test"], mode="audit"),
            ]
            for obj in mine:
                await demo.apply(obj)
            names = [o["metadata"]["name"] for o in examples + mine]
            await demo.settled(names)

            step("3. The rendered table: ConfigMap mail/relay-mailtls")
            cm = demo.server.get_object("v1/configmaps", "mail", "relay-mailtls") or {}
            show(cm.get("data", {}).get("tls_policy", "(missing)"))

            step("4. Status (kubectl get mailtlspolicies -n mail)")
            demo.print_policies()
            for name, inst in demo.pods.items():
                print(f"   {name}: postmap -q mailtls-revision.invalid -> "
                      f"{inst.query('mailtls-revision.invalid')}")

            step("5. Real mail through relay-0")
            q_plain = demo.send("alice@plain.example.test")
            demo.evidence(q_plain, "deferred")
            q_self = demo.send("bob@selfsigned.example.test")
            demo.evidence(q_self, "sent")
            q_ca = demo.send("carol@partner.example.test")
            demo.evidence(q_ca, "sent")

            step("6. Stuck mail, seen: status.deferred of plain-partner (from postqueue -j)")
            deferred = await demo.server.wait_until(lambda: demo.deferred("plain-partner"), 20)
            show(yaml.safe_dump({"deferred": deferred}, sort_keys=False, width=100))

            step("7. Preflight probes (posttls-finger from pod relay-0): status.probes")
            await demo.server.wait_until(lambda: demo.probes("selfsigned-secure-audit"), 20)
            demo.print_probes(["selfsigned-secure-audit", "candidate-secure", "ca-partner",
                               "selfsigned-partner", "plain-partner"])

            step("8. Fix: the plain partner cannot do TLS, relax it to 'may'; the operator "
                 "releases the stuck mail")
            fixed_at = time.monotonic()
            await demo.apply(demo.policy("plain-partner", destinations=[demo.plain.nexthop],
                                         level="may"))
            await asyncio.to_thread(demo.plain.wait_for, 1, 20)
            took = time.monotonic() - fixed_at
            demo.evidence(q_plain, "sent")
            retry = demo.pods["relay-0"].postconf("minimal_backoff_time", "queue_run_delay")
            print(f"   the deferred message reached the sink {took:.2f}s after the fix "
                  f"(rollout to 2 pods + postqueue -i); Postfix's own retry would have waited "
                  f"up to minimal_backoff_time={retry['minimal_backoff_time']}, "
                  f"queue_run_delay={retry['queue_run_delay']}")

            step("9. Break-glass: a temporary 'may' exception over the secure ca-partner")
            now = datetime.now(UTC).replace(microsecond=0)
            brk = demo.policy("ca-partner-break-glass", destinations=[demo.ca_signed.nexthop],
                              level="may", exception={
                                  "startsAt": now.isoformat().replace("+00:00", "Z"),
                                  "expiresAt": (now + timedelta(hours=4)).isoformat()
                                  .replace("+00:00", "Z"),
                                  "reason": "INC-4711 partner certificate expired overnight"})
            await demo.apply(brk)
            names.append("ca-partner-break-glass")
            await demo.settled(names)
            print(f"   relay-0: postmap -q {demo.ca_signed.nexthop} -> "
                  f"{demo.pods['relay-0'].query(demo.ca_signed.nexthop)}")
            for name, ctype in (("ca-partner", "Overridden"),
                                ("ca-partner-break-glass", "BreakGlass")):
                cond = demo.condition(name, ctype) or {}
                print(f"   {name}: {ctype}={cond.get('status')} ({cond.get('reason')}): "
                      f"{cond.get('message')}")
            events = [e for e in demo.server.list_objects("v1/events", "mail")
                      if e["reason"] in ("ExceptionActive", "BreakGlass")]
            for e in events:
                print(f"   event {e['type']} {e['reason']} {e['involvedObject']['name']}")

            step("10. Final status")
            demo.print_policies()
            print(f"\n{BOLD}Demo finished in {time.monotonic() - started:.1f}s; stopping "
                  f"everything.{RESET}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
