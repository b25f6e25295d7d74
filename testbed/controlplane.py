"""A real Kubernetes control plane for tests: etcd and kube-apiserver as subprocesses.

The binaries are compiled from the pinned Go modules under ``tools/`` by
``tools/build.sh`` (``make controlplane``), which caches them outside the work tree and
prints their directory; :func:`binaries_dir` always asks that script (a no-op once
built, and it honours ``KUBEBUILDER_ASSETS`` from ``setup-envtest``), so there is one
way to find them.

:class:`ControlPlane` starts etcd and kube-apiserver on free loopback ports, as
controller-runtime's envtest does, with what the project's tests need from a real
server: TLS with its own CA, RBAC (``Node,RBAC``) with an admin client certificate in
``system:masters``, a ServiceAccount issuer with a signing key (TokenRequest issues
pod-bound tokens) and etcd without fsync.  No controller-manager runs here, so nothing
creates ServiceAccounts, ``kube-root-ca.crt`` or pods.  Unlike envtest, the
``ServiceAccount`` admission plugin stays on, as in every real cluster: a pod names an
existing ServiceAccount (the ``namespace`` test fixture creates ``default``) and gets
the projected token volume a real cluster would mount.  Logs of both processes stay
in the work directory.

Blocking calls: from async code run :meth:`ControlPlane.start` and :meth:`stop` in a
thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from .layout import free_port
from .pki import ControlPlanePKI, make_pki

REPO = Path(__file__).resolve().parent.parent
SERVICE_RANGE = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"
ISSUER = "https://kubernetes.default.svc.cluster.local"
READY_TIMEOUT = 90.0


@dataclass(frozen=True)
class Identity:
    """A ServiceAccount's kubeconfig, the user name the audit log gives its requests,
    and the token the kubeconfig holds."""

    kubeconfig: Path
    user: str
    token: str


class ControlPlaneError(RuntimeError):
    """The control plane could not be built or started; the message says why and
    names the log to read."""


class KubectlError(subprocess.CalledProcessError):
    """kubectl failed; unlike its base class, the message carries kubectl's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}: {str(self.stderr).strip()}"


def binaries_dir() -> Path:
    """The directory holding etcd, kube-apiserver and kubectl: ``tools/build.sh``'s last
    line of output (it builds on first use, which takes many minutes cold)."""
    try:
        done = subprocess.run(["bash", str(REPO / "tools" / "build.sh")],  # noqa: S603
                              capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ControlPlaneError(f"tools/build.sh: {exc}") from exc
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ControlPlaneError(f"tools/build.sh failed ({done.returncode}): {tail}")
    return Path(lines[-1])


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (``VmRSS``), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _stop(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    """TERM the process group, KILL it after ``grace`` seconds, reap the leader."""
    if proc is None or proc.returncode is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class ControlPlane:
    """etcd + kube-apiserver in ``workdir``; a context manager (or start()/stop())."""

    def __init__(self, workdir: Path, *, binaries: Path | None = None,
                 audit: bool = True) -> None:
        self.workdir = workdir
        self.binaries = binaries
        self.url = ""
        self.etcd_url = ""
        self.kubeconfig = workdir / "admin.kubeconfig"
        self.pki: ControlPlanePKI | None = None
        self.etcd: subprocess.Popen[bytes] | None = None
        self.apiserver: subprocess.Popen[bytes] | None = None
        #: Seconds from launching etcd to a ready apiserver with the default namespace.
        self.start_seconds = 0.0
        self._apiserver_args: list[str] = []
        self._ssl: ssl.SSLContext | None = None
        #: kube-apiserver's audit log (JSON lines, level Metadata): what tests count API
        #: requests by verb, resource, user and query from; None with ``audit=False``.
        self.audit_log: Path | None = workdir / "audit.log" if audit else None

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        """Start etcd, then kube-apiserver; return once ``/readyz`` answers ok and the
        ``default`` namespace exists.  Raises :class:`ControlPlaneError` naming the log."""
        began = time.monotonic()
        self.binaries = self.binaries or binaries_dir()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki = make_pki(self.workdir / "pki", service_ip=SERVICE_IP)
        atexit.register(self.stop)
        try:
            self._start_etcd()
            self._apiserver_args = self._apiserver_flags(free_port())
            self._start_apiserver()
            self._write_kubeconfig(self.kubeconfig, user={
                "client-certificate": str(self.pki.admin_cert),
                "client-key": str(self.pki.admin_key)})
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stop kube-apiserver then etcd (whole process groups, reaped); idempotent."""
        _stop(self.apiserver)
        _stop(self.etcd)
        atexit.unregister(self.stop)

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver (TERM, then KILL) and start it again on the same port
        with the same flags; return once it is ready.  Clients see their connections
        and watches end, as in a control-plane upgrade."""
        self.stop_apiserver()
        self.start_apiserver()

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver only (etcd keeps the state): clients get connection
        refused until :meth:`start_apiserver`."""
        _stop(self.apiserver)

    def start_apiserver(self) -> None:
        """Start a stopped kube-apiserver again on its port with its flags; return once
        it is ready."""
        self._start_apiserver()

    def _spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        with log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,  # noqa: S603
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    def _start_etcd(self) -> None:
        assert self.binaries is not None
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self.etcd = self._spawn("etcd", [
            str(self.binaries / "etcd"), "--name=testbed",
            f"--data-dir={self.workdir / 'etcd-data'}",
            f"--listen-client-urls={self.etcd_url}", f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=testbed=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync=true", "--log-level=warn"])
        self._wait("etcd", self.etcd, lambda: self._etcd("/health").get("health") == "true")

    def _apiserver_flags(self, port: int) -> list[str]:
        assert self.binaries is not None and self.pki is not None
        pki = self.pki
        self.url = f"https://127.0.0.1:{port}"
        return [
            str(self.binaries / "kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={port}", f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pki.serving_cert}", f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_file}",
            "--authorization-mode=Node,RBAC",
            f"--service-cluster-ip-range={SERVICE_RANGE}",
            f"--service-account-issuer={ISSUER}",
            f"--service-account-signing-key-file={pki.sa_signing_key}",
            f"--service-account-key-file={pki.sa_public_key}",
            # The loopback address cannot be an endpoint of the `kubernetes` Service.
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true", "--profiling=false", "--v=1",
            *self._kubelet_flags(), *self._audit_flags()]

    def _kubelet_flags(self) -> list[str]:
        """How kube-apiserver reaches a node's kubelet (``pods/exec``, logs): by the
        node's InternalIP (kwok also reports the node name as ``Hostname``, which does not
        resolve here), verifying the kubelet's certificate against the test bed's CA and
        presenting the admin certificate as its client certificate.  Harmless without
        nodes; :mod:`testbed.kwok` serves that endpoint."""
        assert self.pki is not None
        return ["--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-certificate-authority={self.pki.ca_file}",
                f"--kubelet-client-certificate={self.pki.admin_cert}",
                f"--kubelet-client-key={self.pki.admin_key}"]

    def _audit_flags(self) -> list[str]:
        """Every request at level Metadata (who, verb, object, URI with its query, code),
        one JSON line each, appended across restarts."""
        if self.audit_log is None:
            return []
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text("apiVersion: audit.k8s.io/v1\nkind: Policy\n"
                          "omitStages: [RequestReceived]\nrules:\n- level: Metadata\n")
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json", "--audit-log-maxsize=0"]

    def _start_apiserver(self) -> None:
        self.apiserver = self._spawn("kube-apiserver", self._apiserver_args)
        proc = self.apiserver

        def ready() -> bool:
            return (self._get_text("/readyz") == "ok"
                    and self.request("GET", "/api/v1/namespaces/default")["kind"] == "Namespace")
        self._wait("kube-apiserver", proc, ready)

    def _wait(self, name: str, proc: subprocess.Popen[bytes], ready: Any) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with {proc.returncode}; see {self.workdir / name}.log")
            with contextlib.suppress(OSError, ValueError, KeyError, ControlPlaneError):
                if ready():
                    return
            time.sleep(0.2)
        raise ControlPlaneError(
            f"{name} not ready after {READY_TIMEOUT:.0f} s; see {self.workdir / name}.log")

    # -- clients ---------------------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        """The CA that signed the serving and admin certificates."""
        assert self.pki is not None, "start() first"
        return self.pki.ca_file

    @property
    def admin_cert(self) -> Path:
        """The admin's client certificate (CN mailtls-testbed-admin, O system:masters)."""
        assert self.pki is not None, "start() first"
        return self.pki.admin_cert

    @property
    def admin_key(self) -> Path:
        """The admin client certificate's private key."""
        assert self.pki is not None, "start() first"
        return self.pki.admin_key

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.ca_file))
            self._ssl.load_cert_chain(str(self.admin_cert), str(self.admin_key))
        return self._ssl

    def _get_text(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, context=self._context(),
                                    timeout=10) as resp:
            return str(resp.read().decode())

    def request(self, method: str, path: str, body: Any = None, *,
                content_type: str = "application/json") -> Any:
        """One JSON request to kube-apiserver as admin (a PATCH names its patch type in
        ``content_type``); an HTTP error raises :class:`ControlPlaneError` with the
        server's status message."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, context=self._context(),
                                        timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            with contextlib.suppress(ValueError):
                detail = json.loads(detail).get("message", detail)
            raise ControlPlaneError(f"{method} {path}: {exc.code} {detail}") from exc

    def _etcd(self, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        with urllib.request.urlopen(urllib.request.Request(
                self.etcd_url + path, data=data, method="GET" if data is None else "POST"),
                timeout=10) as resp:
            return json.loads(resp.read())

    def version(self) -> dict[str, Any]:
        """The server's ``/version`` (gitVersion is the pinned release, not v0.0.0)."""
        result: dict[str, Any] = self.request("GET", "/version")
        return result

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The built kubectl with the admin kubeconfig (its discovery cache in the work
        directory, never ``~/.kube``).  With ``check``, a failure raises
        :class:`KubectlError` (a ``CalledProcessError`` whose message has stderr)."""
        assert self.binaries is not None, "start() first"
        argv = [str(self.binaries / "kubectl"), f"--kubeconfig={self.kubeconfig}",
                f"--cache-dir={self.workdir / 'kubectl-cache'}", *args]
        done = subprocess.run(argv, input=input, capture_output=True, text=True,  # noqa: S603
                              check=False, timeout=timeout)
        if check and done.returncode != 0:
            raise KubectlError(done.returncode, argv, done.stdout, done.stderr)
        return done

    def api_client(self) -> Any:
        """The official client (``kubernetes.client.ApiClient``) configured as admin."""
        from kubernetes import client

        config = client.Configuration(host=self.url)
        config.ssl_ca_cert = str(self.ca_file)
        config.cert_file = str(self.admin_cert)
        config.key_file = str(self.admin_key)
        return client.ApiClient(config)

    def _write_kubeconfig(self, path: Path, *, user: dict[str, str]) -> Path:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "testbed",
            "clusters": [{"name": "testbed", "cluster": {
                "server": self.url, "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "testbed", "user": user}],
            "contexts": [{"name": "testbed",
                          "context": {"cluster": "testbed", "user": "testbed"}}],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        path.chmod(0o600)
        return path

    def kubeconfig_for_token(self, token: str, path: Path) -> Path:
        """A kubeconfig at ``path`` that authenticates with a bearer token (e.g. a
        ServiceAccount's, to run a process under exactly its RBAC)."""
        return self._write_kubeconfig(path, user={"token": token})

    def kubeconfig_for_client_cert(self, cert: Path, key: Path, path: Path) -> Path:
        """A kubeconfig at ``path`` that authenticates with a client certificate of the
        test bed's CA (a control-plane component's own identity)."""
        return self._write_kubeconfig(path, user={"client-certificate": str(cert),
                                                  "client-key": str(key)})

    def service_account_token(self, namespace: str, sa: str, *, pod: str | None = None,
                              seconds: int = 3600) -> str:
        """A token from the TokenRequest API for ServiceAccount ``sa`` (which must
        exist); with ``pod``, bound to that pod (it must exist and run as ``sa``), so
        the token dies with the pod and its user info names the pod.  The server
        refuses ``seconds`` under 600."""
        spec: dict[str, Any] = {"expirationSeconds": seconds}
        if pod is not None:
            uid = self.request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}")[
                "metadata"]["uid"]
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1",
                                      "name": pod, "uid": uid}
        answer = self.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
             "spec": spec})
        return str(answer["status"]["token"])

    def admin_service_account(self, namespace: str, name: str) -> str:
        """ServiceAccount ``name`` in ``namespace`` (which must exist) bound to
        ``cluster-admin`` by ClusterRoleBinding ``<name>-<namespace>``; either may exist
        already.  Returns the user name the audit log gives its requests.  For a process
        whose requests the audit log should tell apart, not for least privilege."""
        self.create_if_absent(f"/api/v1/namespaces/{namespace}/serviceaccounts",
                     {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
        self.create_if_absent("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": f"{name}-{namespace}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]})
        return f"system:serviceaccount:{namespace}:{name}"

    def admin_identity(self, namespace: str, name: str, kubeconfig: Path, *,
                       pod: str | None = None) -> Identity:
        """:meth:`admin_service_account` plus a kubeconfig at ``kubeconfig`` with a token
        of it (one hour; bound to ``pod`` if given, which must exist and run as it)."""
        user = self.admin_service_account(namespace, name)
        token = self.service_account_token(namespace, name, pod=pod)
        return Identity(self.kubeconfig_for_token(token, kubeconfig), user, token)

    def create_if_absent(self, path: str, body: dict[str, Any]) -> None:
        """POST ``body``; an object that already exists is fine."""
        try:
            self.request("POST", path, body)
        except ControlPlaneError as exc:
            if ": 409 " not in str(exc):
                raise

    def compact_etcd(self) -> int:
        """Compact etcd at its current revision (through its gRPC gateway), so that
        any older resourceVersion is gone; returns that revision."""
        key = base64.b64encode(b"/registry/namespaces/default").decode()
        revision = int(self._etcd("/v3/kv/range", {"key": key})["header"]["revision"])
        self._etcd("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    def apply_crds(self, paths: Iterable[Path | str]) -> None:
        """Apply CRD manifests (server-side: no last-applied annotation, whose 256 KiB
        limit large schemas exceed) and wait until each is Established."""
        names: list[str] = []
        for path in paths:
            done = self.kubectl("apply", "--server-side", "--force-conflicts",
                                "-o", "name", "-f", str(path))
            names += done.stdout.split()
        if names:
            self.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names,
                         timeout=90)
