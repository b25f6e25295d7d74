"""One chart install's privileges on the real server, for the RBAC tests: namespaces,
the rendered ServiceAccounts, Roles, bindings and admission policy, the tokens, and
``mailtls run`` as the operator's ServiceAccount with the chart's own arguments."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.controlplane import ControlPlane, ControlPlaneError
from testbed.wait import until
from tests.cluster.rbac_kit import (
    CLUSTER_KINDS,
    Caller,
    namespace_obj,
    operator_args,
    privileges,
    render,
    to_yaml,
)

MAILTLS = str(Path(sys.executable).with_name("mailtls"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Install:
    """A chart release whose privileges are applied: ``release_ns`` holds the operator's
    ServiceAccount (and its Lease); ``watched`` is where policies and Postfix pods live;
    ``outside`` is a namespace the namespaced mode does not watch; ``other`` holds a
    second agent instance."""

    cp: ControlPlane
    scope: str
    strategy: str
    release: str
    release_ns: str
    watched: str
    outside: str
    other: str
    objects: list[dict[str, Any]] = field(default_factory=list)

    @property
    def service_account(self) -> str:
        [sa] = [o["metadata"]["name"] for o in self.objects if o["kind"] == "ServiceAccount"
                and o["metadata"]["namespace"] == self.release_ns]
        return str(sa)

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.release_ns}:{self.service_account}"

    def operator(self) -> Caller:
        token = self.cp.service_account_token(self.release_ns, self.service_account)
        return Caller(self.cp.url, self.cp.ca_file, token)

    def args(self, health: int) -> list[str]:
        """The chart's arguments, with loopback ports and the downward-API namespace."""
        out: list[str] = []
        for arg in operator_args(self.objects):
            arg = arg.replace("$(POD_NAMESPACE)", self.release_ns)
            if arg.startswith("--health="):
                arg = f"--health=127.0.0.1:{health}"
            elif arg.startswith("--metrics="):
                arg = "--metrics=off"
            out.append(arg)
        return out

    def agent_service_account(self, instance: str) -> str:
        """The ServiceAccount the chart binds to an agent instance's Role."""
        [binding] = [o for o in self.objects if o["kind"] == "RoleBinding"
                     and o["metadata"]["name"] == f"mailtls-agent-{instance}"]
        return str(binding["subjects"][0]["name"])

    @property
    def lease(self) -> str:
        [name] = [a.split("=", 1)[1] for a in operator_args(self.objects)
                  if a.startswith("--lease-name=")]
        return name


def values(scope: str, strategy: str, release: str, watched: str, other: str) -> dict[str, Any]:
    out: dict[str, Any] = {"strategy": strategy, "fullnameOverride": release}
    if scope == "namespaced":
        out["watchNamespaces"] = [watched]
    if strategy == "agent":
        out["agent"] = {"instances": [{"namespace": watched, "name": "relay"},
                                      {"namespace": watched, "name": "second"},
                                      {"namespace": other, "name": "other"}]}
    return out


@contextmanager
def installed(cp: ControlPlane, base: str, scope: str, strategy: str) -> Iterator[Install]:
    """Apply the chart's privileges for (scope, strategy) as admin; remove the
    cluster-scoped ones afterwards (namespaced ones go with their namespaces)."""
    release = f"mailtls-{base}"
    inst = Install(cp, scope, strategy, release, base, f"{base}-mail", f"{base}-off",
                   f"{base}-other")
    for ns in (inst.watched, inst.outside, inst.other):  # with the ServiceAccount a pod
        cp.kubectl("apply", "-f", "-", input=to_yaml([  # gets by default (no controllers)
            namespace_obj(ns), {"apiVersion": "v1", "kind": "ServiceAccount",
                                "metadata": {"name": "default", "namespace": ns}}]))
    inst.objects = render(values(scope, strategy, release, inst.watched, inst.other),
                          release=release, namespace=inst.release_ns)
    granted = privileges(inst.objects)
    cp.kubectl("apply", "-f", "-", input=to_yaml(granted))
    # The RBAC authorizer reads roles from an informer: wait until it sees the binding.
    until(lambda: cp.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": inst.user, "resourceAttributes": {
            "group": "apiextensions.k8s.io", "resource": "customresourcedefinitions",
            "verb": "get", "name": "mailtlspolicies.mailtls.io"}}})["status"].get("allowed"),
          10, f"the authorizer never granted {inst.user} its ClusterRole")
    try:
        yield inst
    finally:
        for obj in granted:
            if obj["kind"] in CLUSTER_KINDS:
                cp.kubectl("delete", "--ignore-not-found", "--wait=false",
                           f"{obj['kind'].lower()}.{obj['apiVersion'].split('/')[0]}"
                           if "/" in obj["apiVersion"] else obj["kind"].lower(),
                           obj["metadata"]["name"], check=False)
        for ns in (inst.watched, inst.outside, inst.other):
            _empty(cp, ns)
            with suppress(ControlPlaneError):
                cp.request("DELETE", f"/api/v1/namespaces/{ns}")


#: What a test here creates in its namespaces. Without a namespace controller a deleted
#: namespace keeps its content, and a later cluster-wide operator would act on it.
_CONTENT = ("/apis/mailtls.io/v1alpha1/namespaces/{}/mailtlspolicies",
            "/api/v1/namespaces/{}/pods?gracePeriodSeconds=0",
            "/apis/apps/v1/namespaces/{}/statefulsets",
            "/api/v1/namespaces/{}/configmaps")


def _empty(cp: ControlPlane, ns: str) -> None:
    for collection in _CONTENT:
        with suppress(ControlPlaneError):
            cp.request("DELETE", collection.format(ns))


@dataclass
class OperatorProcess:
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running_operator(inst: Install, workdir: Path) -> Iterator[OperatorProcess]:
    """``mailtls run`` with the chart's arguments and a kubeconfig holding only the
    operator ServiceAccount's TokenRequest token; SIGTERM at the end (it must exit 0)."""
    token = inst.cp.service_account_token(inst.release_ns, inst.service_account)
    kubeconfig = inst.cp.kubeconfig_for_token(token, workdir / "operator.kubeconfig")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    log = workdir / "operator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([MAILTLS, *inst.args(free_port())],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    running = OperatorProcess(proc, log)
    try:
        yield running
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            proc.wait(5)
            raise AssertionError(
                f"mailtls run did not stop on SIGTERM:\n{running.text()}") from exc
