"""kwok beside the real control plane: fake Nodes whose "kubelet" runs exec locally.

kwok ("Kubernetes WithOut Kubelet", a SIG project, built by ``tools/build.sh`` from the
pinned module) runs out of cluster with the admin kubeconfig, as kwokctl's binary
runtime runs it.  It manages the Nodes that carry :data:`NODE_ANNOTATION` (the test
creates them), takes pods bound to them (``spec.nodeName``; no scheduler needed)
through its stages to Running and Ready, and serves the kubelet API for all of them on
one loopback port.  The node stage writes that port into each Node's
``status.daemonEndpoints`` and ``127.0.0.1`` as its InternalIP, which is where
kube-apiserver (flags in :meth:`ControlPlane._kubelet_flags`) sends ``pods/exec``.

Exec in a pod's container is mapped to a local command by an ``Exec`` object
(``kwok.x-k8s.io/v1alpha1``, named like the pod, in its namespace) with a working
directory and environment: :meth:`Kwok.map_exec` points a pod at a local Postfix
instance by its ``MAIL_CONFIG``.  The command is looked up on kwok's own ``PATH``
(Postfix's sbin directories are on it).  kube-apiserver speaks SPDY to this "kubelet"
and translates a client's ``v5.channel.k8s.io`` websocket onto it, as with a real one.

The stages are the ones kwok ships (``kustomize/stage/{node,pod}/fast``) and the ``Exec``
CRD its own (``kustomize/crd/bases``), read from the module source ``tools/build.sh``
keeps beside the binary (``kwok-src``); kwokctl embeds and applies the same files.

kwok v0.8.0 is built with two small patches (``tools/kwok/patches``), without which
exec is not a kubelet's: it never closed the command's stdin when the client closed
it (so ``postmap -q -`` or ``cat`` waited for ever even over v5), and it reported a
non-zero exit as an internal error (HTTP 500 ``Status``) instead of
``NonZeroExitCode`` with the code.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from .controlplane import ControlPlane, ControlPlaneError, _stop
from .layout import SBIN_PATH, free_port

#: Nodes with this annotation are kwok's (kwokctl's convention).
NODE_ANNOTATION = "kwok.x-k8s.io/node"
NODE_ANNOTATION_VALUE = "fake"
#: The stages kwok ships, relative to its module: nodes Ready, pods Running and Ready,
#: completed, deleted.
STAGE_FILES = ("kustomize/stage/node/fast/node-initialize.yaml",
               "kustomize/stage/pod/fast/pod-ready.yaml",
               "kustomize/stage/pod/fast/pod-complete.yaml",
               "kustomize/stage/pod/fast/pod-delete.yaml")
#: kwokctl's node heartbeat when kwok keeps node Leases (its default, 40 s): with a
#: controller-manager, the node lifecycle controller would otherwise find the nodes'
#: heartbeats stale and taint them.
HEARTBEAT_STAGE = "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml"
POD_READY_STAGE = "kustomize/stage/pod/fast/pod-ready.yaml"
NODE_LEASE_SECONDS = 40
EXEC_CRD = "kustomize/crd/bases/kwok.x-k8s.io_execs.yaml"
KWOK_API = "/apis/kwok.x-k8s.io/v1alpha1"
READY_TIMEOUT = 60.0


def module_dir(binaries: Path) -> Path:
    """kwok's patched module source, which ``tools/build.sh`` keeps beside the binary."""
    src = binaries / "kwok-src"
    if not (binaries / "kwok").is_file() or not src.is_dir():
        raise ControlPlaneError(f"kwok: no kwok and kwok-src in {binaries} (KUBEBUILDER_ASSETS"
                                " has none: unset it and run `make controlplane`)")
    return src


def stage_documents(binaries: Path, *, leases: bool = False,
                    ready_gate: str | None = None) -> str:
    """kwok's default stages as one multi-document YAML; with ``leases`` also the node
    heartbeat, with ``ready_gate`` a pod-ready stage that waits for that annotation."""
    module = module_dir(binaries)
    docs = []
    names = STAGE_FILES + ((HEARTBEAT_STAGE,) if leases else ())
    for name in names:
        path = module / name
        try:
            text = path.read_text()
        except OSError as exc:
            raise ControlPlaneError(f"kwok stages: {path}: {exc.strerror}") from exc
        if name == POD_READY_STAGE and ready_gate:
            text = gated(text, ready_gate)
        docs.append(text)
    return "\n---\n".join(docs)


def gated(stage_yaml: str, annotation: str) -> str:
    """The stage, selecting only objects whose ``annotation`` is ``"true"``: kwok takes
    a pod to Running and Ready only once the test bed has started what the pod's
    containers would run (a kubelet reports Ready only after its containers started)."""
    stage = yaml.safe_load(stage_yaml)
    stage["spec"]["selector"]["matchExpressions"].append({
        "key": f'.metadata.annotations["{annotation}"]', "operator": "In",
        "values": ["true"]})
    return str(yaml.safe_dump(stage, sort_keys=False))


class Kwok:
    """One kwok process serving the kubelet API on ``127.0.0.1:port`` for every node it
    manages; a context manager (or start()/stop()).  Its log is ``kwok.log`` in
    ``workdir``."""

    def __init__(self, plane: ControlPlane, workdir: Path, *,
                 binary: Path | None = None, path: Sequence[Path] = (),
                 leases: bool = False, ready_gate: str | None = None,
                 nodes: str = NODE_ANNOTATION_VALUE) -> None:
        """``path``: directories put first on kwok's ``PATH``, where a mapped exec looks
        its command up; ``nodes``: the :data:`NODE_ANNOTATION` value of the nodes this
        kwok manages (two kwoks on one server must not both manage a node: each would
        give its pods an IP, and the server refuses two); ``leases``: node Leases and
        heartbeats as kwokctl keeps them (needed beside a controller-manager);
        ``ready_gate``: pods become Ready only once they carry that annotation with
        ``"true"`` (see :func:`gated`)."""
        self.plane = plane
        self.binary = binary
        #: directories put first on kwok's PATH, where a mapped exec looks its command up
        #: (e.g. shims that run it in a container instead)
        self.path = list(path)
        self.workdir = workdir
        self.leases = leases
        self.ready_gate = ready_gate
        self.nodes = nodes
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "kwok.log"

    def __enter__(self) -> Kwok:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> Kwok:
        """Start kwok and return once its kubelet endpoint answers ``/healthz`` and its
        ``Exec`` CRD is Established."""
        assert self.plane.binaries is not None and self.plane.pki is not None, "plane first"
        pki = self.plane.pki
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "kwok.yaml"
        config.write_text(stage_documents(self.plane.binaries, leases=self.leases,
                                          ready_gate=self.ready_gate))
        # kwok watches the CRDs it is told to enable but does not install them.
        self.plane.apply_crds([module_dir(self.plane.binaries) / EXEC_CRD])
        self.port = free_port()
        argv = [str(self.binary or self.plane.binaries / "kwok"),
                f"--kubeconfig={self.plane.kubeconfig}", f"--config={config}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={NODE_ANNOTATION}={self.nodes}",
                "--node-ip=127.0.0.1", f"--node-port={self.port}",
                f"--server-address=127.0.0.1:{self.port}",
                f"--tls-cert-file={pki.kubelet_cert}",
                f"--tls-private-key-file={pki.kubelet_key}",
                f"--node-lease-duration-seconds={NODE_LEASE_SECONDS if self.leases else 0}",
                "--enable-crds=Exec"]
        env = dict(os.environ)
        env["PATH"] = ":".join([*map(str, self.path), SBIN_PATH, env.get("PATH", "")])
        env["HOME"] = str(self.workdir)  # never ~/.kwok
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,  # noqa: S603
                                         stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop kwok (its process group, reaped); idempotent.  Its nodes and pods stay."""
        _stop(self.proc, grace=5.0)
        atexit.unregister(self.stop)

    def _wait_ready(self) -> None:
        assert self.proc is not None
        ctx = ssl.create_default_context(cafile=str(self.plane.ca_file))
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ControlPlaneError(f"kwok exited with {self.proc.returncode};"
                                        f" see {self.log}")
            with contextlib.suppress(OSError, ValueError, ControlPlaneError):
                url = f"https://127.0.0.1:{self.port}/healthz"
                with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
                    healthy = resp.read().strip() == b"ok"
                if healthy and self.plane.request("GET", f"{KWOK_API}/execs")["kind"]:
                    return
            time.sleep(0.2)
        raise ControlPlaneError(f"kwok not ready after {READY_TIMEOUT:.0f} s; see {self.log}")

    # -- nodes, pods, exec mappings -------------------------------------------------

    def add_node(self, name: str, *, timeout: float = 30.0) -> dict[str, Any]:
        """Create a Node kwok manages and return it once kwok has made it Ready.  Its
        labels are kwokctl's (``kustomize/kwokctl/resource/node.yaml``): the well-known
        ones a kubelet sets, which charts select on (``kubernetes.io/os: linux``)."""
        self.plane.request("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {NODE_ANNOTATION: self.nodes},
                         "labels": {"type": "kwok", "kubernetes.io/hostname": name,
                                    "kubernetes.io/os": "linux",
                                    "kubernetes.io/arch": "amd64"}}})
        return self._wait(f"/api/v1/nodes/{name}", _ready, timeout, f"node {name} Ready")

    def run_pod(self, namespace: str, name: str, node: str, *, container: str = "postfix",
                image: str = "registry.invalid/postfix:test",
                labels: Mapping[str, str] | None = None,
                annotations: Mapping[str, str] | None = None,
                timeout: float = 30.0) -> dict[str, Any]:
        """Create a pod bound to ``node`` (no scheduler) and return it once Running and
        Ready (kwok's pod stage; nothing runs the image)."""
        self.plane.request("POST", f"/api/v1/namespaces/{namespace}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": dict(labels or {}),
                         "annotations": dict(annotations or {})},
            "spec": {"nodeName": node, "containers": [{"name": container, "image": image}]}})
        return self._wait(f"/api/v1/namespaces/{namespace}/pods/{name}",
                          lambda pod: pod["status"].get("phase") == "Running" and _ready(pod),
                          timeout, f"pod {namespace}/{name} Running and Ready")

    def map_exec(self, namespace: str, pod: str, *, work_dir: Path | str,
                 env: Mapping[str, str], containers: tuple[str, ...] = ()) -> None:
        """Map exec in ``pod`` (in ``containers``, or all) to local commands run in
        ``work_dir`` with ``env`` added to kwok's environment (an ``Exec`` object)."""
        target: dict[str, Any] = {"local": {
            "workDir": str(work_dir),
            "envs": [{"name": k, "value": v} for k, v in env.items()]}}
        if containers:
            target["containers"] = list(containers)
        self.plane.request("POST", f"{KWOK_API}/namespaces/{namespace}/execs", {
            "apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Exec",
            "metadata": {"name": pod, "namespace": namespace},
            "spec": {"execs": [target]}})

    def unmap_exec(self, namespace: str, pod: str) -> None:
        """Remove the ``Exec`` object of ``pod`` (gone already is fine)."""
        try:
            self.plane.request("DELETE", f"{KWOK_API}/namespaces/{namespace}/execs/{pod}")
        except ControlPlaneError as exc:
            if ": 404 " not in str(exc):
                raise

    def _wait(self, path: str, done: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.plane.request("GET", path)
            if done(last):
                return last
            if self.proc is not None and self.proc.poll() is not None:
                raise ControlPlaneError(f"kwok exited with {self.proc.returncode};"
                                        f" see {self.log}")
            time.sleep(0.1)
        status = json.dumps(last.get("status", {}))[:400]
        raise ControlPlaneError(f"{what}: not after {timeout:g} s (status {status});"
                                f" see {self.log}")


def _ready(obj: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in obj.get("status", {}).get("conditions") or [])
