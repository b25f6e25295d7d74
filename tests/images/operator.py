"""The operator container as the chart runs it, pointed at the API emulation on the host.

Read from the chart's rendered Deployment (default values): the pod and container
securityContext and the volumes (the ``/tmp`` emptyDir), translated by
:mod:`tests.images.pods`; the container's ``args`` (``run --all-namespaces
--leader-elect --lease-namespace=$(POD_NAMESPACE) ...``) after the image's own
ENTRYPOINT, with ``$(VAR)`` expanded from its env as the kubelet does and the
downward-API variables set to the pod's name and namespace.

What differs from a cluster: the kubeconfig that a cluster would give as an in-cluster
service account is a read-only file mount, and on the host's network the health and
metrics ports are free loopback ports instead of ``0.0.0.0:8080``/``:9090``; a test may
override more flags (``debounce="0.1"``) to keep itself quick.
"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.images.harness import free_port, operator_pod, unique
from tests.images.pods import OPERATOR_IMAGE, Container, Volumes, container_args
from tests.integration.test_run_command import kubeconfig

KUBECONFIG = "/etc/mailtls-test/kubeconfig"
POD_NAMESPACE = "mailtls-system"  # where the chart is installed (tests/contract/kit.py)


@dataclass
class OperatorContainer:
    """``mailtls run`` in the operator image, with the chart's args and securityContext."""

    base: Path
    api_url: str
    health_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    pod_name: str = field(default_factory=lambda: unique("mailtls-operator"))
    container: Container | None = None

    @property
    def downward(self) -> dict[str, str]:
        return {"metadata.name": self.pod_name, "metadata.namespace": POD_NAMESPACE}

    def run_args(self, overrides: dict[str, str]) -> list[str]:
        """The chart's args, ``$(VAR)`` expanded, ``--flag=value`` overridden."""
        _, main = operator_pod()
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
        spec, main = operator_pod()
        volumes = Volumes(self.base / "volumes", spec["volumes"])
        volumes.materialise()
        config = kubeconfig(self.base, self.api_url)  # the one `mailtls run` tests use
        config.chmod(0o644)  # read by uid 65532
        return [*container_args(spec, main, volumes, self.downward),
                "--volume", f"{config}:{KUBECONFIG}:ro", "--env", f"KUBECONFIG={KUBECONFIG}"]

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
