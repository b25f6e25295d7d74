"""``mailtls run`` as a user runs it against the real kube-apiserver: the current
kubeconfig, /healthz and /metrics served, JSON log lines, SIGTERM ends it with 0; and
without the CRD it says so and exits instead of waiting."""

from __future__ import annotations

import json
import time
import urllib.request

import kubernetes.client
import pytest

from testbed.controlplane import ControlPlane

from .conftest import REPO, StartOperator
from .helpers import Cluster, free_port, not_found, policy, until

pytestmark = pytest.mark.cluster
CRD = "mailtlspolicies.mailtls.io"


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return int(resp.status), resp.read().decode()


def test_run_uses_the_current_kubeconfig_and_serves_health_and_metrics(
        cluster: Cluster, start_operator: StartOperator) -> None:
    metrics = free_port()
    op = start_operator("--metrics", f"127.0.0.1:{metrics}", "--log-format", "json")
    cluster.apply(policy("p", cluster.ns, destinations=["a.example"], level="encrypt"))
    until(lambda: cluster.table() == ["a.example encrypt"], what="the table")
    status, _ = _get(f"http://127.0.0.1:{op.health}/healthz")
    assert status == 200
    status, text = _get(f"http://127.0.0.1:{metrics}/metrics")
    assert status == 200 and "mailtls_configmap_writes_total" in text
    assert op.stop() == 0
    # --log-format json: every log line is one JSON object with the fields log tools read
    records = [json.loads(line) for line in op.text().splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any("ConfigMap" in r["message"] and "relay-mailtls" in r["message"]
               for r in records)


def test_run_without_the_crd_says_so_and_exits(
        cluster: Cluster, start_operator: StartOperator, controlplane: ControlPlane) -> None:
    ext = kubernetes.client.ApiextensionsV1Api(cluster.client)
    ext.delete_custom_resource_definition(CRD)  # every policy of the session goes with it

    def gone() -> bool:
        try:
            ext.read_custom_resource_definition(CRD)
        except kubernetes.client.ApiException as exc:
            if not_found(exc):
                return True
            raise
        return False

    try:
        until(gone, 120, what="the CRD deleted", every=0.5)
        op = start_operator("--log-format", "json", wait=False)
        op.exit_expected = True
        deadline = time.monotonic() + 60
        while op.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not op.alive(), f"still running without the CRD:\n{op.tail()}"
        assert op.stop() not in (0, None)
    finally:
        controlplane.apply_crds(sorted((REPO / "crds").glob("*.yaml")))
    out = op.text()
    assert f"the CRD {CRD} is not installed in this cluster" in out
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any("is not installed" in r["message"] for r in records)
