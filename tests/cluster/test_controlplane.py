"""The test bed's control plane does what the cluster tests rely on: the pinned
version, RBAC with an admin, pod-bound ServiceAccount tokens, apiserver restarts and
etcd compaction that makes old resourceVersions gone."""

from __future__ import annotations

import json
import ssl
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from testbed.controlplane import ControlPlane

pytestmark = pytest.mark.cluster

POD_NAME_KEY = "authentication.kubernetes.io/pod-name"


def _pod(name: str, sa: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"serviceAccountName": sa,
                     "containers": [{"name": "c", "image": "registry.invalid/none:0"}]}}


def _first_watch_event(controlplane: ControlPlane, path: str) -> dict[str, Any]:
    """The first event of a watch, read as the admin, bounded in time."""
    context = ssl.create_default_context(cafile=str(controlplane.ca_file))
    context.load_cert_chain(str(controlplane.admin_cert), str(controlplane.admin_key))
    with urllib.request.urlopen(controlplane.url + path, context=context, timeout=20) as resp:
        event: dict[str, Any] = json.loads(resp.readline())
    return event


def test_version_is_the_pinned_release(controlplane: ControlPlane) -> None:
    version = controlplane.version()
    assert version["gitVersion"].startswith("v1.") and version["gitVersion"] != "v0.0.0"
    client_version = json.loads(controlplane.kubectl("version", "-o", "json").stdout)
    assert client_version["clientVersion"]["gitVersion"] == version["gitVersion"]
    assert client_version["serverVersion"]["gitVersion"] == version["gitVersion"]


def test_admin_is_system_masters_and_rbac_refuses_a_bare_service_account(
        controlplane: ControlPlane, namespace: str, tmp_path: Path) -> None:
    who = json.loads(controlplane.kubectl("auth", "whoami", "-o", "json").stdout)
    assert "system:masters" in who["status"]["userInfo"]["groups"]
    token = controlplane.service_account_token(namespace, "default")
    config = controlplane.kubeconfig_for_token(token, tmp_path / "sa.kubeconfig")
    denied = controlplane.kubectl("--kubeconfig", str(config), "get", "secrets",
                                  "-n", namespace, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr and f"system:serviceaccount:{namespace}:default" \
        in denied.stderr


def test_token_request_bound_to_a_pod_names_the_pod(
        controlplane: ControlPlane, namespace: str, tmp_path: Path) -> None:
    controlplane.kubectl("create", "serviceaccount", "agent", "-n", namespace)
    controlplane.kubectl("apply", "-n", namespace, "-f", "-",
                         input=json.dumps(_pod("postfix-0", "agent")))
    token = controlplane.service_account_token(namespace, "agent", pod="postfix-0",
                                               seconds=600)
    config = controlplane.kubeconfig_for_token(token, tmp_path / "agent.kubeconfig")
    who = json.loads(controlplane.kubectl("--kubeconfig", str(config),
                                          "auth", "whoami", "-o", "json").stdout)
    user = who["status"]["userInfo"]
    assert user["username"] == f"system:serviceaccount:{namespace}:agent"
    assert user["extra"][POD_NAME_KEY] == ["postfix-0"]


def test_token_request_refuses_a_pod_of_another_service_account(
        controlplane: ControlPlane, namespace: str) -> None:
    controlplane.kubectl("create", "serviceaccount", "agent", "-n", namespace)
    controlplane.kubectl("apply", "-n", namespace, "-f", "-",
                         input=json.dumps(_pod("other", "default")))
    with pytest.raises(Exception, match=r"400|does not match|service account"):
        controlplane.service_account_token(namespace, "agent", pod="other")


def test_objects_survive_an_apiserver_restart(
        controlplane: ControlPlane, namespace: str) -> None:
    controlplane.kubectl("create", "configmap", "kept", "-n", namespace,
                         "--from-literal=k=v")
    url = controlplane.url
    controlplane.restart_apiserver()
    assert controlplane.url == url
    got = json.loads(controlplane.kubectl("get", "configmap", "kept", "-n", namespace,
                                          "-o", "json").stdout)
    assert got["data"] == {"k": "v"}


def test_compaction_makes_a_watch_from_an_old_resource_version_gone(
        controlplane: ControlPlane, namespace: str) -> None:
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    created = controlplane.request("POST", path, {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "churn"}})
    old = created["metadata"]["resourceVersion"]
    for n in range(3):
        controlplane.kubectl("patch", "configmap", "churn", "-n", namespace, "--type=merge",
                             "-p", json.dumps({"data": {"n": str(n)}}))
    revision = controlplane.compact_etcd()
    assert revision > int(old)
    controlplane.restart_apiserver()  # the watch cache starts over above the compacted revision
    first = _first_watch_event(controlplane, f"{path}?watch=1&resourceVersion={old}")
    assert first["type"] == "ERROR"
    assert first["object"]["code"] == 410
