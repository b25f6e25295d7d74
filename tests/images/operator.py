"""The operator container as the chart runs it, pointed at the API emulation on the host.

The chart's pod and container securityContext and its volumes (the ``/tmp`` emptyDir)
are translated by :mod:`tests.images.pods`; the kubeconfig that a cluster would give
as an in-cluster service account is a read-only file mount here, and the health port
is a free loopback port (host network).
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.images.harness import free_port, operator_pod, unique
from tests.images.pods import OPERATOR_IMAGE, Container, Volumes, container_args
from tests.integration.test_run_command import kubeconfig

KUBECONFIG = "/etc/mailtls-test/kubeconfig"


@dataclass
class OperatorContainer:
    """``mailtls run`` in the operator image, under the chart's securityContext."""

    base: Path
    api_url: str
    health_port: int = field(default_factory=free_port)
    name: str = field(default_factory=lambda: unique("mailtls-operator"))
    container: Container | None = None

    def args(self) -> list[str]:
        spec, main = operator_pod()
        volumes = Volumes(self.base / "volumes", spec["volumes"])
        volumes.materialise()
        config = kubeconfig(self.base, self.api_url)  # the one `mailtls run` tests use
        config.chmod(0o644)  # read by uid 65532
        return [*container_args(spec, main, volumes),
                "--volume", f"{config}:{KUBECONFIG}:ro", "--env", f"KUBECONFIG={KUBECONFIG}"]

    def start(self, *run_args: str) -> Container:
        self.container = Container.start(
            self.name, OPERATOR_IMAGE, self.args(),
            ["run", "--health", f"127.0.0.1:{self.health_port}", "--metrics", "off",
             *run_args])
        self.container.wait_for("/healthz", self.healthy, timeout=60)
        return self.container

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz",
                                        timeout=1) as resp:
                return int(resp.status) == 200
        except OSError:  # refused, reset or timed out (TimeoutError is an OSError)
            return False

    def remove(self) -> None:
        if self.container is not None:
            self.container.remove()
