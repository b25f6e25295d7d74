"""The operator container as the chart runs it, against the real kube-apiserver.

Read from the chart's rendered Deployment (default values): the pod and container
securityContext and the volumes (the ``/tmp`` emptyDir), translated by
:mod:`tests.images.pods`; the container's ``args`` (``run --all-namespaces
--leader-elect --lease-namespace=$(POD_NAMESPACE) ...``) after the image's own
ENTRYPOINT, with ``$(VAR)`` expanded from its env as the kubelet does and the
downward-API variables set to the pod's name and namespace.

Credentials are the chart's too: ``automountServiceAccountToken: true``, so the
container gets what a kubelet mounts -- a TokenRequest token of the chart's
ServiceAccount (bound by the chart's own RBAC, applied by the test), the cluster CA and
the namespace under ``/var/run/secrets/kubernetes.io/serviceaccount`` -- and
``KUBERNETES_SERVICE_HOST``/``_PORT``; ``mailtls run`` takes its in-cluster path.

What differs from a cluster: the container shares the host's network
(``images/containers.conf``), so the "service" address is kube-apiserver's loopback
address (its serving certificate names 127.0.0.1), and the health and metrics ports are
free loopback ports instead of ``0.0.0.0:8080``/``:9090``; a test may override more
flags (``debounce="0.1"``) to keep itself quick.
"""

from __future__ import annotations

import re
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from testbed.controlplane import ControlPlane
from tests.cluster.rbac_setup import Install
from tests.images.harness import free_port, operator_pod, unique
from tests.images.pods import OPERATOR_IMAGE, Container, Volumes, container_args

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def service_account_mount(plane: ControlPlane, namespace: str, service_account: str,
                          directory: Path) -> list[str]:
    """``podman run`` options giving a container what the kubelet mounts for a pod of
    ``service_account``: token, ca.crt and namespace, plus the service's address."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "token").write_text(plane.service_account_token(namespace, service_account))
    shutil.copyfile(plane.ca_file, directory / "ca.crt")
    (directory / "namespace").write_text(namespace)
    for path in (directory, *directory.iterdir()):  # read by uid 65532
        path.chmod(0o755 if path.is_dir() else 0o644)
    url = urllib.parse.urlsplit(plane.url)
    return ["--volume", f"{directory}:{SERVICE_ACCOUNT_DIR}:ro",
            "--env", f"KUBERNETES_SERVICE_HOST={url.hostname}",
            "--env", f"KUBERNETES_SERVICE_PORT={url.port}"]


@dataclass
class OperatorContainer:
    """``mailtls run`` in the operator image, with the args, securityContext and
    ServiceAccount of the chart release ``install`` (its RBAC applied)."""

    base: Path
    install: Install
    health_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    pod_name: str = field(default_factory=lambda: unique("mailtls-operator"))
    container: Container | None = None

    @property
    def downward(self) -> dict[str, str]:
        return {"metadata.name": self.pod_name, "metadata.namespace": self.install.release_ns}

    def run_args(self, overrides: dict[str, str]) -> list[str]:
        """The chart's args, ``$(VAR)`` expanded, ``--flag=value`` overridden."""
        _, main = operator_pod(self.install.objects)
        env = {e["name"]: self.downward[e["valueFrom"]["fieldRef"]["fieldPath"]]
               for e in main["env"] if "valueFrom" in e}
        wanted = {"--health": f"127.0.0.1:{self.health_port}",
                  "--metrics": f"127.0.0.1:{self.metrics_port}",
                  **{f"--{k.replace('_', '-')}": v for k, v in overrides.items()}}
        out = []
        for arg in main["args"]:
            arg = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), arg)
            flag, eq, _ = arg.partition("=")
            out.append(f"{flag}={wanted.pop(flag)}" if eq and flag in wanted else arg)
        assert not wanted, f"the chart passes no {sorted(wanted)}"
        return out

    def podman_args(self) -> list[str]:
        spec, main = operator_pod(self.install.objects)
        assert spec.get("automountServiceAccountToken") is True, "the chart's pod has no token"
        volumes = Volumes(self.base / "volumes", spec["volumes"])
        volumes.materialise()
        return [*container_args(spec, main, volumes, self.downward),
                *service_account_mount(self.install.cp, self.install.release_ns,
                                       self.install.service_account,
                                       self.base / "serviceaccount")]

    def start(self, **overrides: str) -> Container:
        self.container = Container.start(self.pod_name, OPERATOR_IMAGE, self.podman_args(),
                                         self.run_args(overrides))
        self.container.wait_for("/healthz", lambda: self.get("health", "/healthz") is not None,
                                timeout=60)
        return self.container

    def get(self, port: str, path: str) -> str | None:
        """The body of a 200 answer from the health or metrics port, else None."""
        number = self.health_port if port == "health" else self.metrics_port
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{number}{path}", timeout=1) as resp:
                return resp.read().decode() if int(resp.status) == 200 else None
        except OSError:  # refused, reset or timed out (TimeoutError is an OSError)
            return None

    def remove(self) -> None:
        if self.container is not None:
            self.container.remove()
