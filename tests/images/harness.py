"""The two pods of the image tests, laid out from the manifests themselves.

* :class:`PostfixPod`: the example Deployment (``manifests/examples/postfix``): its
  init container ``load-tables`` run to completion, then its ``postfix`` container
  started by the image's entrypoint, each with its own securityContext and mounts.
* :func:`operator_pod`: the chart's Deployment (default values): the operator
  container's securityContext, the pod's, and its volumes (the ``/tmp`` emptyDir).

What differs from a cluster, and why: the containers share the host's network
(``images/containers.conf``), so the test mounts a ``master.cf`` whose smtpd listens
on a free loopback port instead of port 25, sets ``inet_interfaces = 127.0.0.1`` in
the example ``main.cf``, and adds the site's own transport table (an lmdb table at
``/etc/postfix-site``) routing the test domain to the SMTP sink on the host.
Everything else is the example's own.
"""

from __future__ import annotations

import re
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.contract.kit import EXAMPLES, chart_objects, find
from tests.images.pods import POSTFIX_IMAGE, Container, Volumes, container_args, podman

EXAMPLE = EXAMPLES / "postfix"
MAP_PATH = "/var/lib/mailtls/tls_policy"
SITE = "/etc/postfix-site"  # the test's own master.cf and site routes (not in the example)

Obj = dict[str, Any]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def example_pod() -> tuple[Obj, Obj]:
    """The example Postfix Deployment's pod template: (metadata, spec)."""
    doc = yaml.safe_load((EXAMPLE / "deployment.yaml").read_text(encoding="utf-8"))
    template: Obj = doc["spec"]["template"]
    return template["metadata"], template["spec"]


def operator_pod(objects: list[Obj] | None = None) -> tuple[Obj, Obj]:
    """The chart's operator pod spec and its operator container, from ``objects`` (a
    rendered release) or the default values."""
    (deployment,) = find(chart_objects() if objects is None else objects, "Deployment")
    spec: Obj = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "operator"]
    return spec, container


def _container(spec: Obj, name: str, kind: str = "containers") -> Obj:
    found: Obj = next(c for c in spec[kind] if c["name"] == name)
    return found


@dataclass
class PostfixPod:
    """The example Postfix pod on this machine, with the test's network overrides."""

    base: Path
    smtpd_port: int = field(default_factory=free_port)
    routes: dict[str, str] = field(default_factory=dict)  # domain -> transport:nexthop
    name: str = field(default_factory=lambda: unique("mailtls-postfix"))
    container: Container | None = None

    def __post_init__(self) -> None:
        self.metadata, self.spec = example_pod()
        self.volumes = Volumes(self.base / "volumes", self.spec["volumes"])

    def main_cf(self) -> str:
        text = (EXAMPLE / "main.cf").read_text(encoding="utf-8")
        # The site's own routes after the operator's table, in an lmdb table the operator
        # can read too (it follows hash/lmdb/cdb transport tables to find next-hops).
        transport = "lmdb:/var/lib/mailtls/transport" + (
            f", lmdb:{SITE}/transport" if self.routes else "")
        for name, value in (("inet_interfaces", "127.0.0.1"), ("transport_maps", transport)):
            text, count = re.subn(rf"^{name} = .*$", f"# image tests:\n{name} = {value}",
                                  text, count=1, flags=re.MULTILINE)
            assert count == 1, f"no {name} in the example main.cf"
        return text

    def master_cf(self) -> str:
        """The image's master.cf with smtpd on 127.0.0.1:PORT instead of port 25."""
        text = podman("run", "--rm", "--entrypoint", "cat", POSTFIX_IMAGE,
                      "/etc/postfix/master.cf").stdout.decode()
        new, count = re.subn(r"^smtp(\s+inet\s)", rf"127.0.0.1:{self.smtpd_port}\1", text,
                             count=1, flags=re.MULTILINE)
        assert count == 1, "no smtpd inet service in the image's master.cf"
        return new

    def lay_out(self, tables: dict[str, str] | None = None) -> None:
        """The volumes: ConfigMaps as the example's kustomization generates them."""
        self.volumes.config_maps.update({
            "relay-postfix": {"main.cf": self.main_cf(),
                              "load-tables.sh": (EXAMPLE / "load-tables.sh").read_text()},
            "relay-tls-trust": {"partner-ca.pem": (EXAMPLE / "partner-ca.pem").read_text()},
        })
        if tables is not None:
            self.volumes.config_maps["relay-mailtls"] = tables
        self.volumes.materialise()
        site = self.base / "site"
        site.mkdir(parents=True, exist_ok=True)
        (site / "master.cf").write_text(self.master_cf(), encoding="utf-8")
        (site / "transport").write_text("".join(f"{d} {r}\n" for d, r in self.routes.items()),
                                        encoding="utf-8")
        # Compiled by the image's own postmap, so the lmdb format is the container's.
        podman("run", "--rm", "--volume", f"{site}:{SITE}:rw", "--entrypoint", "postmap",
               POSTFIX_IMAGE, f"lmdb:{SITE}/transport")

    def load_tables(self) -> str:
        """Run the init container to completion; its output (it must succeed)."""
        init = _container(self.spec, "load-tables", "initContainers")
        args = container_args(self.spec, init, self.volumes)
        result = podman("run", "--rm", *args, POSTFIX_IMAGE, *init.get("args", []), timeout=120)
        return (result.stdout + result.stderr).decode()

    def start(self) -> Container:
        """The postfix container, started by the image's entrypoint; waits until smtpd listens."""
        main = _container(self.spec, "postfix")
        args = container_args(self.spec, main, self.volumes)
        site = self.base / "site"
        args += ["--volume", f"{site / 'master.cf'}:/etc/postfix/master.cf:ro",
                 "--volume", f"{site}:{SITE}:ro"]
        self.container = Container.start(self.name, POSTFIX_IMAGE, args)
        self.container.wait_for(f"smtpd on 127.0.0.1:{self.smtpd_port}", self._listening)
        return self.container

    def _listening(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.smtpd_port)) == 0

    def stop(self) -> None:
        if self.container is not None:
            self.container.remove()

    @property
    def annotations(self) -> dict[str, str]:
        found: dict[str, str] = self.metadata["annotations"]
        return found

    @property
    def labels(self) -> dict[str, str]:
        found: dict[str, str] = self.metadata["labels"]
        return found

    def send(self, recipient: str, sender: str = "test@relay.mail.test") -> None:
        """Submit a message inside the container with sendmail(1), as an application would."""
        assert self.container is not None
        message = (f"From: {sender}\nTo: {recipient}\nSubject: image test\n\n"
                   "Hello from the Postfix container.\n").encode()
        result = self.container.exec("sendmail", "-f", sender, recipient, stdin=message)
        assert result.returncode == 0, result.stderr.decode()

    def query(self, key: str) -> str | None:
        assert self.container is not None
        result = self.container.exec("postmap", "-q", key, f"lmdb:{MAP_PATH}")
        return result.stdout.decode().strip() if result.returncode == 0 else None
