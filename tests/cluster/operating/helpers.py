"""Drive ``mailtls run`` against the real kube-apiserver as a user would.

The operator is a subprocess with its own kubeconfig (a ServiceAccount token, so the audit
log tells its requests from the test's); the test is kubectl, through the official client.
Everything here is synchronous: the operator lives in another process, so the test needs
no event loop of its own.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import kubernetes.client

from mailtls_operator.render import REVISION_KEY
from testbed import LocalInstance, wait
from testbed.controlplane import ControlPlane, Identity

GROUP, VERSION, PLURAL = "mailtls.io", "v1alpha1", "mailtlspolicies"
MAILTLS = str(Path(sys.executable).with_name("mailtls"))


def until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "",
          every: float = 0.1) -> Any:
    """:func:`testbed.wait.until` failing the test at the deadline (these tests' defaults)."""
    return wait.until(predicate, timeout, what or repr(predicate), every=every,
                      error=AssertionError)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def policy(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("instances", ["relay"])
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MailTLSPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def not_found(exc: kubernetes.client.ApiException) -> bool:
    return bool(exc.status == 404)


class OperatorProcess:
    """One ``mailtls run`` process; its log (stdout and stderr) goes to a file, never to a
    pipe that could fill up and stall it."""

    def __init__(self, kubeconfig: Path, log: Path, args: Sequence[str],
                 env: dict[str, str] | None = None) -> None:
        self.kubeconfig, self.log, self.args = kubeconfig, log, list(args)
        self.health = free_port()
        self.env = env or {}
        #: a test that breaks the connection expects tracebacks of connection errors
        self.tracebacks_ok = False
        #: a test that makes it exit with an error checks the code itself
        self.exit_expected = False
        #: the log up to the SIGTERM of :meth:`stop` (Kopf 1.x may log a traceback of an
        #: async generator while it shuts down, which is not the operator's doing)
        self.running_log = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), **self.env}
        env.pop("KUBERNETES_SERVICE_HOST", None)  # never the in-cluster config
        argv = [MAILTLS, "run", "--log-format", "text", "--metrics", "off",
                "--health", f"127.0.0.1:{self.health}", *self.args]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health}/healthz",
                                        timeout=1) as resp:
                status: int = resp.status
                return status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 30.0) -> None:
        until(lambda: self.healthy() or (not self.alive() and "exited"), timeout,
              f"{self.log.name} serves /healthz")
        assert self.alive(), f"the operator exited:\n{self.tail()}"

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def wait_log(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        regex = re.compile(pattern)
        found: re.Match[str] = until(lambda: regex.search(self.text()), timeout,
                                     f"log line /{pattern}/")
        return found

    def kill(self) -> None:
        """SIGKILL: no clean-up, no Lease released (a crashed or evicted replica)."""
        if self.alive():
            self.running_log = self.text()
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.running_log = self.text()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class Cluster:
    """What a user does with kubectl, through the official client, as the admin."""

    def __init__(self, client: kubernetes.client.ApiClient, namespace: str) -> None:
        # typed as Any: these tests send and read plain dicts, not the client's models
        self.client: Any = client
        self.ns = namespace
        self.custom: Any = kubernetes.client.CustomObjectsApi(client)
        self.core: Any = kubernetes.client.CoreV1Api(client)
        self.apps: Any = kubernetes.client.AppsV1Api(client)
        self.coordination: Any = kubernetes.client.CoordinationV1Api(client)
        self.rbac: Any = kubernetes.client.RbacAuthorizationV1Api(client)

    def ensure_namespace(self, name: str) -> None:
        try:
            self.core.create_namespace({"metadata": {"name": name}})
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise

    # --- policies -------------------------------------------------------------------

    def get_policy(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace or self.ns, PLURAL, name))
        except kubernetes.client.ApiException as exc:
            if not_found(exc):
                return None
            raise

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create, or replace the spec of an existing policy (like kubectl apply)."""
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        try:
            return cast(dict[str, Any], self.custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, obj))
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise
        return cast(dict[str, Any], self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, name,
            [{"op": "replace", "path": "/spec", "value": obj["spec"]}],
            _content_type="application/json-patch+json"))

    def apply_many(self, objs: Iterable[dict[str, Any]], workers: int = 16) -> None:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(self.apply, objs):
                pass

    def create_pod(self, body: dict[str, Any]) -> None:
        self.core.create_namespaced_pod(self.ns, cast(Any, body))

    def mark_ready(self, pod: str) -> None:
        """What a kubelet would report: the pod Running and Ready (none runs here)."""
        self.core.patch_namespaced_pod_status(pod, self.ns, {"status": {
            "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})

    def create_configmap(self, body: dict[str, Any]) -> None:
        self.core.create_namespaced_config_map(self.ns, cast(Any, body))

    def lease(self, name: str = "mailtls-operator") -> dict[str, Any]:
        lease = self.coordination.read_namespaced_lease(name, self.ns)
        return cast(dict[str, Any], self.client.sanitize_for_serialization(lease))

    def delete(self, name: str, namespace: str | None = None) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace or self.ns,
                                                    PLURAL, name)

    def statuses(self, namespace: str | None = None) -> dict[str, dict[str, Any]]:
        """Every policy's status by name, in one list request."""
        listed = self.custom.list_namespaced_custom_object(GROUP, VERSION,
                                                           namespace or self.ns, PLURAL)
        return {o["metadata"]["name"]: o.get("status") or {} for o in listed["items"]}

    def status(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        obj = self.get_policy(name, namespace) or {}
        return cast(dict[str, Any], obj.get("status") or {})

    def condition(self, name: str, type_: str,
                  namespace: str | None = None) -> dict[str, Any] | None:
        return next((c for c in self.status(name, namespace).get("conditions", [])
                     if c["type"] == type_), None)

    def has(self, name: str, type_: str, namespace: str | None = None) -> dict[str, Any]:
        found = self.condition(name, type_, namespace)
        assert found is not None, f"{name} has no {type_} condition"
        return found

    # --- what the operator writes ---------------------------------------------------

    def configmap(self, instance: str = "relay",
                  namespace: str | None = None) -> dict[str, Any] | None:
        try:
            cm = self.core.read_namespaced_config_map(f"{instance}-mailtls",
                                                      namespace or self.ns)
        except kubernetes.client.ApiException as exc:
            if not_found(exc):
                return None
            raise
        return cast(dict[str, Any], self.client.sanitize_for_serialization(cm))

    def table(self, instance: str = "relay", namespace: str | None = None) -> list[str] | None:
        """The table's entries without comments and the revision sentinel."""
        cm = self.configmap(instance, namespace)
        if cm is None:
            return None
        text = (cm.get("data") or {}).get("tls_policy", "")
        return [ln for ln in text.splitlines()
                if ln and not ln.startswith("#") and not ln.startswith(REVISION_KEY)]

    def events(self, namespace: str | None = None) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_event(namespace or self.ns).items
        return [cast(dict[str, Any], self.client.sanitize_for_serialization(e))
                for e in items]

    def policy_events(self, namespace: str | None = None) -> list[tuple[str, str]]:
        """(reason, policy name) of every Event about a MailTLSPolicy."""
        return [(e.get("reason", ""), e["involvedObject"].get("name", ""))
                for e in self.events(namespace)
                if e["involvedObject"].get("kind") == "MailTLSPolicy"]


@dataclass(frozen=True)
class AgentPod:
    """Pod ``relay-0`` and its ``mailtls agent`` process (log in ``log``)."""

    proc: subprocess.Popen[bytes]
    log: Path
    identity: Identity


@contextmanager
def agent_pod(controlplane: ControlPlane, cluster: Cluster, inst: LocalInstance,
              workdir: Path, *agent_args: str) -> Iterator[AgentPod]:
    """Pod ``relay-0`` of instance ``relay`` (agent strategy) as an API object on
    ``node-a``, Running and Ready at 127.0.0.1, whose Postfix is ``inst`` and whose agent
    is a ``mailtls agent`` process with ``agent_args``, running as ServiceAccount
    ``mailtls-agent`` (cluster-admin) with a token bound to the pod, as the kubelet
    would project it.  The agent is stopped at the end; ``inst`` is the caller's."""
    ns = cluster.ns
    kubeconfig = workdir / "agent.kubeconfig"
    controlplane.admin_service_account(ns, "mailtls-agent")  # before the pod that names it
    cluster.create_pod({
        "metadata": {"name": "relay-0", "labels": {"mailtls.io/instance": "relay"},
                     "annotations": {"mailtls.io/strategy": "agent",
                                     "mailtls.io/map-path": str(inst.map_path),
                                     "mailtls.io/map-type": inst.settings.map_type}},
        "spec": {"nodeName": "node-a", "serviceAccountName": "mailtls-agent", "containers": [
            {"name": "postfix", "image": "postfix"}, {"name": "agent", "image": "mailtls"}]}})
    identity = controlplane.admin_identity(ns, "mailtls-agent", kubeconfig, pod="relay-0")
    cluster.core.patch_namespaced_pod_status("relay-0", ns, {"status": {
        "phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
        "conditions": [{"type": "Ready", "status": "True"}]}})
    env = {**os.environ, **inst.env, "POD_NAME": "relay-0", "POD_NAMESPACE": ns,
           "PATH": f"{inst.env['PATH']}:{os.environ.get('PATH', '')}"}
    log = workdir / "agent.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailtls_operator.cli", "agent", "--instance", "relay",
             "--kubeconfig", str(identity.kubeconfig), "--map-path", str(inst.map_path),
             "--map-type", inst.settings.map_type, "--configmap-dir", str(inst.configmap_dir),
             *agent_args],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield AgentPod(proc, log, identity)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
