"""kube-controller-manager and kube-scheduler beside the real kube-apiserver.

Both are compiled by ``tools/build.sh`` from the pinned ``k8s.io/kubernetes`` module and
run out of cluster, as kwokctl's binary runtime runs them
(``pkg/kwokctl/components/kube_{controller_manager,scheduler}.go``): a kubeconfig each,
``--bind-address`` and ``--secure-port`` on loopback with ``/healthz`` always allowed,
``--root-ca-file`` and ``--service-account-private-key-file`` for the controller-manager.
Where this differs from kwokctl, it follows kubeadm's static pods instead, so that what
the controllers do is what a cluster's would do under its own RBAC:

- each component authenticates with its own client certificate (``system:kube-
  controller-manager``, ``system:kube-scheduler``: the users the bootstrap RBAC policy
  grants), not the admin's, so the audit log tells their requests apart;
- ``--use-service-account-credentials``: every controller runs as its own
  ServiceAccount in ``kube-system`` (tokens from the TokenRequest API);
- ``--cluster-signing-cert-file/-key-file``: the test bed's CA signs approved
  CertificateSigningRequests;
- ``--leader-elect=false`` (one replica each: no Lease traffic) and ``--controllers=*``
  (every controller that is on by default).

:class:`Controllers` starts both and returns once the controllers act: the root CA
publisher has written ``kube-root-ca.crt`` and the ServiceAccount controller the
``default`` ServiceAccount into the ``default`` namespace.  Start time and RSS of each
are kept for the figures in docs/testbed.md.
"""

from __future__ import annotations

import atexit
import contextlib
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from .controlplane import ControlPlane, ControlPlaneError, _stop, rss_kib
from .layout import free_port

READY_TIMEOUT = 90.0


class Component:
    """One control-plane binary run against ``plane``; its log is ``<name>.log``."""

    name = ""

    def __init__(self, plane: ControlPlane, workdir: Path) -> None:
        self.plane = plane
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{self.name}.log"
        #: Seconds from launch to ``/healthz`` ok.
        self.start_seconds = 0.0

    def flags(self, kubeconfig: Path) -> list[str]:
        """The component's own flags (after the binary, before the common ones)."""
        raise NotImplementedError

    def client_cert(self) -> tuple[Path, Path]:
        """The component's client certificate and key."""
        raise NotImplementedError

    def start(self) -> None:
        """Launch it and wait for ``/healthz`` (raises :class:`ControlPlaneError`)."""
        assert self.plane.binaries is not None and self.plane.pki is not None, "plane first"
        pki = self.plane.pki
        self.workdir.mkdir(parents=True, exist_ok=True)
        cert, key = self.client_cert()
        kubeconfig = self.plane.kubeconfig_for_client_cert(
            cert, key, self.workdir / f"{self.name}.kubeconfig")
        self.port = free_port()
        argv = [str(self.plane.binaries / self.name), *self.flags(kubeconfig),
                "--bind-address=127.0.0.1", f"--secure-port={self.port}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
                "--leader-elect=false", "--profiling=false", "--v=1"]
        began = time.monotonic()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,  # noqa: S603
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        atexit.register(self.stop)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Stop it (its process group, reaped); idempotent."""
        _stop(self.proc, grace=5.0)
        atexit.unregister(self.stop)

    @property
    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid) if self.proc is not None else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        ctx = ssl.create_default_context(cafile=str(self.plane.ca_file))
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ControlPlaneError(f"{self.name} exited with {self.proc.returncode};"
                                        f" see {self.log}")
            with contextlib.suppress(OSError, ValueError):
                url = f"https://127.0.0.1:{self.port}/healthz"
                with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
                    if resp.read().strip() == b"ok":
                        return
            time.sleep(0.2)
        raise ControlPlaneError(f"{self.name} not healthy after {READY_TIMEOUT:.0f} s;"
                                f" see {self.log}")


class ControllerManager(Component):
    """kube-controller-manager: Deployments, ReplicaSets, StatefulSets, ServiceAccounts
    and their tokens, the root CA ConfigMap, garbage collection, namespace deletion."""

    name = "kube-controller-manager"

    def client_cert(self) -> tuple[Path, Path]:
        assert self.plane.pki is not None
        return self.plane.pki.controller_manager_cert, self.plane.pki.controller_manager_key

    def flags(self, kubeconfig: Path) -> list[str]:
        assert self.plane.pki is not None
        pki = self.plane.pki
        return [f"--kubeconfig={kubeconfig}",
                f"--root-ca-file={pki.ca_file}",
                f"--service-account-private-key-file={pki.sa_signing_key}",
                f"--cluster-signing-cert-file={pki.ca_file}",
                f"--cluster-signing-key-file={pki.ca_key}",
                "--use-service-account-credentials=true",
                "--controllers=*"]


class Scheduler(Component):
    """kube-scheduler: binds pods to (kwok's) nodes."""

    name = "kube-scheduler"

    def client_cert(self) -> tuple[Path, Path]:
        assert self.plane.pki is not None
        return self.plane.pki.scheduler_cert, self.plane.pki.scheduler_key

    def flags(self, kubeconfig: Path) -> list[str]:
        return [f"--kubeconfig={kubeconfig}"]


class Controllers:
    """The controller-manager and the scheduler; a context manager (or start()/stop())."""

    def __init__(self, plane: ControlPlane, workdir: Path) -> None:
        self.plane = plane
        self.controller_manager = ControllerManager(plane, workdir)
        self.scheduler = Scheduler(plane, workdir)
        #: Seconds from launching the controller-manager to its first objects written.
        self.acting_seconds = 0.0

    def __enter__(self) -> Controllers:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> Controllers:
        """Start both; return once the controllers have written their first objects."""
        began = time.monotonic()
        try:
            self.controller_manager.start()
            self.scheduler.start()
            self._wait_acting()
        except BaseException:
            self.stop()
            raise
        self.acting_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        self.scheduler.stop()
        self.controller_manager.stop()

    def figures(self) -> dict[str, float]:
        """Start seconds and RSS (MiB) of each, for docs and the bench."""
        out: dict[str, float] = {"controllers_acting_s": round(self.acting_seconds, 2)}
        for c in (self.controller_manager, self.scheduler):
            out[f"{c.name}_start_s"] = round(c.start_seconds, 2)
            out[f"{c.name}_rss_mib"] = round(c.rss_kib / 1024, 1)
        return out

    def _wait_acting(self) -> None:
        """The root CA publisher and the ServiceAccount controller have run (each as its
        own ServiceAccount, which the controller-manager first has to create)."""
        deadline = time.monotonic() + READY_TIMEOUT
        paths = ("/api/v1/namespaces/default/configmaps/kube-root-ca.crt",
                 "/api/v1/namespaces/default/serviceaccounts/default")
        todo = list(paths)
        while todo and time.monotonic() < deadline:
            if not self.controller_manager.alive():
                raise ControlPlaneError(f"kube-controller-manager exited; see "
                                        f"{self.controller_manager.log}")
            try:
                self.plane.request("GET", todo[0])
                todo.pop(0)
                continue
            except ControlPlaneError:
                pass
            time.sleep(0.2)
        if todo:
            raise ControlPlaneError(f"kube-controller-manager: no {todo[0]} after "
                                    f"{READY_TIMEOUT:.0f} s; see {self.controller_manager.log}")
