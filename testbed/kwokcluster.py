"""A whole small cluster for ``make demo`` and ``make bench``: real API server, kwok pods.

:class:`KwokCluster` starts a :class:`~.controlplane.ControlPlane` (etcd + kube-apiserver,
audit log on), applies the project's CRDs, starts :class:`~.kwok.Kwok` with one fake
node, and turns started :class:`~.instance.LocalInstance` Postfix instances into pods:
an API object bound to the node (kwok makes it Running and Ready) whose exec kwok maps
to local commands against that instance.  So the operator's exec strategy goes through
the real ``pods/exec`` of kube-apiserver, and its agent strategy watches the real server.

Identities: :meth:`KwokCluster.identity` makes a ServiceAccount bound to
``cluster-admin`` and a kubeconfig with its token, so the audit log tells the
operator's requests from everyone else's.  Blocking calls throughout: from async code
run them in a thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kopf

from mailtls_operator.podrunner import PodRef, PodRunner, PodRunnerError

from .auditlog import AuditTail
from .controlplane import REPO, ControlPlane, Identity
from .instance import LocalInstance
from .kwok import Kwok
from .lifecycle import StartStop

NODE = "kwok-node-0"
INSTANCE_LABEL = "mailtls.io/instance"


class KwokCluster(StartStop):
    """Control plane + CRDs + kwok with one node, in ``workdir``; a context manager."""

    def __init__(self, workdir: Path, *, binaries: Path | None = None) -> None:
        self.workdir = workdir
        self.plane = ControlPlane(workdir / "controlplane", binaries=binaries)
        self.kwok = Kwok(self.plane, workdir / "kwok")
        self._namespaces: set[str] = set()
        self._identities: dict[tuple[str, str], Identity] = {}
        self.started_in = 0.0

    def start(self) -> KwokCluster:
        began = time.monotonic()
        self.plane.start()
        try:
            self.plane.apply_crds(sorted((REPO / "crds").glob("*.yaml")))
            self.kwok.start()
            self.kwok.add_node(NODE)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began
        return self

    def stop(self) -> None:
        """kwok, then kube-apiserver and etcd (process groups, reaped); idempotent."""
        try:
            self.kwok.stop()
        finally:
            self.plane.stop()

    # -- what is there ------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.plane.url

    def git_version(self) -> str:
        """The server's ``/version`` gitVersion (the pinned release)."""
        return str(self.plane.version()["gitVersion"])

    def audit(self) -> AuditTail:
        """The audit log from now on."""
        assert self.plane.audit_log is not None
        return AuditTail(self.plane.audit_log, lambda path: self.plane.request("GET", path))

    def api_client(self, identity: Identity | None = None, *, pool: int = 16) -> Any:
        """The official client (``kubernetes.client.ApiClient``) as the admin, or as
        ``identity`` (its token); ``pool`` connections at most."""
        from kubernetes import client

        config = client.Configuration(host=self.url)
        config.ssl_ca_cert = str(self.plane.ca_file)
        config.connection_pool_maxsize = pool
        if identity is None:
            config.cert_file = str(self.plane.admin_cert)
            config.key_file = str(self.plane.admin_key)
        else:
            config.api_key = {"authorization": identity.token}
            config.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(config)

    def connection_info(self, identity: Identity) -> kopf.ConnectionInfo:
        """Kopf's credentials for ``identity`` on this server (an in-process operator)."""
        return kopf.ConnectionInfo(server=self.url, ca_path=str(self.plane.ca_file),
                                   token=identity.token, default_namespace="default")

    # -- namespaces, identities, pods ---------------------------------------------

    def namespace(self, name: str) -> str:
        """Create namespace ``name`` with its ``default`` ServiceAccount (no controller-
        manager here makes it); nothing if it exists."""
        if name in self._namespaces:
            return name
        for path, body in (
                ("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                        "metadata": {"name": name}}),
                (f"/api/v1/namespaces/{name}/serviceaccounts",
                 {"apiVersion": "v1", "kind": "ServiceAccount",
                  "metadata": {"name": "default"}})):
            self.plane.create_if_absent(path, body)
        self._namespaces.add(name)
        return name

    def identity(self, namespace: str, name: str) -> Identity:
        """ServiceAccount ``name`` in ``namespace`` bound to cluster-admin, and a
        kubeconfig with a token of it (one hour)."""
        key = (namespace, name)
        if key in self._identities:
            return self._identities[key]
        self.namespace(namespace)
        found = self.plane.admin_identity(
            namespace, name, self.workdir / "identities" / f"{namespace}-{name}.kubeconfig")
        self._identities[key] = found
        return found

    def postfix_pod(self, namespace: str, name: str, inst: LocalInstance, *,
                    instance: str = "relay", annotations: Mapping[str, str] | None = None,
                    labels: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Pod ``namespace/name`` of Postfix instance ``instance`` (label
        ``mailtls.io/instance``), Running and Ready on the kwok node, whose container
        ``postfix`` execs into ``inst``; annotated with the table's path and type (the
        operator's ``mailtls.io/map-path`` and ``map-type``) plus ``annotations``."""
        self.namespace(namespace)
        self.kwok.map_exec(namespace, name, work_dir=inst.root, env=inst.env,
                           containers=("postfix",))
        return self.kwok.run_pod(
            namespace, name, NODE,
            labels={INSTANCE_LABEL: instance, "app": "postfix", **(labels or {})},
            annotations={"mailtls.io/map-path": str(inst.map_path),
                         "mailtls.io/map-type": inst.settings.map_type,
                         **(annotations or {})})


async def exec_ready(runner: PodRunner, pods: list[PodRef], timeout: float = 20.0) -> float:
    """Until ``true`` runs in every pod (kwok learns of a new ``Exec`` mapping through its
    watch, about a second after it was made); returns the seconds waited."""
    began = time.monotonic()
    for pod in pods:
        while True:
            try:
                if (await runner.run(pod, ["true"], timeout=10)).returncode == 0:
                    break
            except PodRunnerError:
                if time.monotonic() - began > timeout:
                    raise
            await asyncio.sleep(0.1)
    return time.monotonic() - began

