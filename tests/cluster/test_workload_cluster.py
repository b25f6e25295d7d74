"""The workload cluster's controllers do what a cluster's do (``testbed/workloadcluster.py``): the
scheduler binds pods to kwok's nodes, kwok brings them up once the sandbox has started
them, and the controller-manager runs Deployments, ReplicaSets, StatefulSets,
ServiceAccounts and their tokens, the root CA ConfigMap, CSR signing, garbage collection
and namespace deletion -- each controller under its own ServiceAccount."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from testbed.controlplane import ControlPlaneError
from testbed.sandbox import STARTED
from testbed.wait import until
from testbed.workloadcluster import WorkloadCluster

pytestmark = pytest.mark.cluster


def _get(kc: WorkloadCluster, path: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = kc.plane.request("GET", path)
    except ControlPlaneError as exc:
        if ": 404 " in str(exc):
            return None
        raise
    return found


def _apply(kc: WorkloadCluster, ns: str, obj: dict[str, Any]) -> None:
    kc.plane.kubectl("apply", "-n", ns, "--server-side", "-f", "-", input=json.dumps(obj))


def _deployment(name: str, replicas: int) -> dict[str, Any]:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {
                         "containers": [{"name": "web", "image": "registry.invalid/web"}]}}}}


def _pods(kc: WorkloadCluster, ns: str, selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kc.plane.request(
        "GET", f"/api/v1/namespaces/{ns}/pods?labelSelector={selector}")["items"]
    return items


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in pod.get("status", {}).get("conditions") or [])


def test_a_deployment_is_scheduled_onto_kwok_nodes_and_becomes_available(
        workload_cluster: WorkloadCluster, workload_namespace: str) -> None:
    kc, ns = workload_cluster, workload_namespace
    _apply(kc, ns, _deployment("web", 3))
    kc.plane.kubectl("rollout", "status", "-n", ns, "deploy/web", "--timeout=60s",
                     timeout=70)
    pods = _pods(kc, ns, "app=web")
    assert len(pods) == 3 and all(_ready(p) for p in pods)
    assert {p["spec"]["nodeName"] for p in pods} <= set(kc.nodes)
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        assert pod["metadata"]["annotations"][STARTED] == "true"
        owner = pod["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "ReplicaSet" and owner["name"].startswith("web-")
    events = kc.plane.request("GET", f"/api/v1/namespaces/{ns}/events")["items"]
    scheduled = [e for e in events if e["reason"] == "Scheduled"]
    assert len(scheduled) == 3
    assert {e.get("reportingComponent") for e in scheduled} == {"default-scheduler"}


def test_a_new_namespace_gets_its_serviceaccount_token_and_root_ca(
        workload_cluster: WorkloadCluster, workload_namespace: str) -> None:
    kc, ns = workload_cluster, workload_namespace
    root_ca = until(lambda: _get(kc, f"/api/v1/namespaces/{ns}/configmaps/kube-root-ca.crt"),
                     30, "kube-root-ca.crt")
    assert root_ca["data"]["ca.crt"] == kc.plane.ca_file.read_text()
    # a legacy token Secret is filled in by the token controller (signed with the key
    # kube-apiserver verifies with)
    kc.plane.request("POST", f"/api/v1/namespaces/{ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
        "metadata": {"name": "legacy", "annotations": {
            "kubernetes.io/service-account.name": "default"}}})
    secret: dict[str, Any] = until(
        lambda: ((s := _get(kc, f"/api/v1/namespaces/{ns}/secrets/legacy"))
                 and "token" in (s.get("data") or {}) and s) or None,
        30, "the token filled in")
    token = base64.b64decode(secret["data"]["token"]).decode()
    review = kc.plane.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "spec": {"token": token}})
    assert review["status"]["authenticated"] is True
    assert review["status"]["user"]["username"] == f"system:serviceaccount:{ns}:default"


def test_the_controllers_act_under_their_own_serviceaccounts(
        workload_cluster: WorkloadCluster) -> None:
    kc = workload_cluster
    accounts = kc.plane.request("GET", "/api/v1/namespaces/kube-system/serviceaccounts")
    names = {a["metadata"]["name"] for a in accounts["items"]}
    assert {"deployment-controller", "replicaset-controller", "statefulset-controller",
            "generic-garbage-collector", "namespace-controller"} <= names
    assert kc.plane.audit_log is not None
    users = {json.loads(line)["user"]["username"]
             for line in kc.plane.audit_log.read_text().splitlines()
             if '"replicasets"' in line and '"create"' in line}
    assert "system:serviceaccount:kube-system:deployment-controller" in users


def test_an_approved_csr_is_signed_by_the_cluster_ca(workload_cluster: WorkloadCluster) -> None:
    kc = workload_cluster
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone")]))
           .sign(key, hashes.SHA256()))
    pem = csr.public_bytes(serialization.Encoding.PEM)
    name = f"someone-{time.monotonic_ns()}"
    kc.plane.request("POST", "/apis/certificates.k8s.io/v1/certificatesigningrequests", {
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"name": name},
        "spec": {"request": base64.b64encode(pem).decode(), "usages": ["client auth"],
                 "signerName": "kubernetes.io/kube-apiserver-client"}})
    kc.plane.kubectl("certificate", "approve", name)
    path = f"/apis/certificates.k8s.io/v1/certificatesigningrequests/{name}"
    signed = until(lambda: (c := _get(kc, path)) and c["status"].get("certificate"), 30,
                    "the certificate issued")
    cert = x509.load_pem_x509_certificate(base64.b64decode(signed))
    ca = x509.load_pem_x509_certificate(kc.plane.ca_file.read_bytes())
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)


def test_deleting_a_deployment_collects_its_replicasets_and_pods(
        workload_cluster: WorkloadCluster, workload_namespace: str) -> None:
    kc, ns = workload_cluster, workload_namespace
    _apply(kc, ns, _deployment("gone", 2))
    kc.plane.kubectl("rollout", "status", "-n", ns, "deploy/gone", "--timeout=60s",
                     timeout=70)
    kc.plane.kubectl("delete", "-n", ns, "deploy/gone", "--cascade=background", "--wait=false")
    until(lambda: not kc.plane.request(
        "GET", f"/apis/apps/v1/namespaces/{ns}/replicasets")["items"], 30,
        "the ReplicaSet collected")
    until(lambda: not _pods(kc, ns, "app=gone"), 30, "the pods collected")


def test_a_statefulset_starts_its_pods_one_by_one_in_order(
        workload_cluster: WorkloadCluster, workload_namespace: str) -> None:
    kc, ns = workload_cluster, workload_namespace
    labels = {"app": "db"}
    _apply(kc, ns, {"apiVersion": "apps/v1", "kind": "StatefulSet",
                    "metadata": {"name": "db"},
                    "spec": {"replicas": 3, "serviceName": "db",
                             "selector": {"matchLabels": labels},
                             "template": {"metadata": {"labels": labels}, "spec": {
                                 "containers": [{"name": "db", "image": "registry.invalid/db"}]}}}})
    kc.plane.kubectl("rollout", "status", "-n", ns, "statefulset/db", "--timeout=60s",
                     timeout=70)
    pods = {p["metadata"]["name"]: p for p in _pods(kc, ns, "app=db")}
    assert sorted(pods) == ["db-0", "db-1", "db-2"]

    def ready_at(pod: dict[str, Any]) -> str:
        return str(next(c["lastTransitionTime"] for c in pod["status"]["conditions"]
                        if c["type"] == "Ready"))
    # OrderedReady: each pod is created only once the one before it is Ready
    for before, after in (("db-0", "db-1"), ("db-1", "db-2")):
        assert ready_at(pods[before]) <= pods[after]["metadata"]["creationTimestamp"]


def test_a_deleted_namespace_is_emptied_and_removed(workload_cluster: WorkloadCluster) -> None:
    kc = workload_cluster
    ns = f"doomed-{time.monotonic_ns()}"
    kc.plane.request("POST", "/api/v1/namespaces", {
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    _apply(kc, ns, _deployment("app", 1))
    kc.plane.kubectl("rollout", "status", "-n", ns, "deploy/app", "--timeout=60s",
                     timeout=70)
    kc.plane.request("DELETE", f"/api/v1/namespaces/{ns}")
    until(lambda: _get(kc, f"/api/v1/namespaces/{ns}") is None, 60, "the namespace gone")
    assert not kc.plane.request("GET", f"/api/v1/namespaces/{ns}/pods")["items"]
