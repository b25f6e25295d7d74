"""A rollout end to end through the real kube-apiserver: ``mailtls run`` writes the table,
a real ``mailtls agent`` process (the sidecar of a Pod object the test created and marked
Running) installs it into a local Postfix and reports in its pod's annotations, and the
policy's status says RolledOut. No exec: the agent strategy needs none (exec through the
API server needs a kubelet, which this control plane has not)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import LocalInstance
from testbed.controlplane import ControlPlane, Identity
from testbed.instance import postfix_unavailable
from testbed.layout import InstanceSettings

from .audit import AuditLog
from .conftest import StartOperator, admin_service_account
from .helpers import Cluster, policy, until

pytestmark = [pytest.mark.cluster, pytest.mark.postfix]


@pytest.fixture
def postfix_pod(cluster: Cluster, controlplane: ControlPlane,
                tmp_path: Path) -> Iterator[LocalInstance]:
    """Pod ``relay-0`` (agent strategy) as an API object, Running and Ready, whose Postfix
    is a local instance and whose agent is a ``mailtls agent`` process."""
    reason = postfix_unavailable()
    if reason is not None:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="mailtls-pods-"))
    base.chmod(0o755)  # Postfix daemons (user postfix) must reach into it
    inst = LocalInstance(base / "relay-0", InstanceSettings(name="relay-0"))
    inst.start()
    ns = cluster.ns
    agent_kubeconfig = tmp_path / "agent.kubeconfig"
    admin_service_account(controlplane, cluster, "mailtls-agent", agent_kubeconfig)
    cluster.create_pod({
        "metadata": {"name": "relay-0", "labels": {"mailtls.io/instance": "relay"},
                     "annotations": {"mailtls.io/strategy": "agent",
                                     "mailtls.io/map-path": str(inst.map_path),
                                     "mailtls.io/map-type": inst.settings.map_type}},
        "spec": {"nodeName": "node-a", "serviceAccountName": "mailtls-agent", "containers": [
            {"name": "postfix", "image": "postfix"}, {"name": "agent", "image": "mailtls"}]}})
    # its token now bound to the pod, as the kubelet would project it
    agent_id = admin_service_account(controlplane, cluster, "mailtls-agent", agent_kubeconfig,
                                     pod="relay-0")
    cluster.core.patch_namespaced_pod_status("relay-0", ns, {"status": {
        "phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
        "conditions": [{"type": "Ready", "status": "True"}]}})
    env = {**os.environ, **inst.env, "POD_NAME": "relay-0", "POD_NAMESPACE": ns,
           "PATH": f"{inst.env['PATH']}:{os.environ.get('PATH', '')}"}
    log = (tmp_path / "agent.log").open("ab")
    agent = subprocess.Popen(
        [sys.executable, "-m", "mailtls_operator.cli", "agent", "--instance", "relay",
         "--kubeconfig", str(agent_id.kubeconfig), "--map-path", str(inst.map_path),
         "--map-type", inst.settings.map_type, "--configmap-dir", str(inst.configmap_dir),
         "--observe-interval", "0"],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield inst
    finally:
        agent.terminate()
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(10)
        log.close()
        inst.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_the_agent_of_a_pod_installs_each_revision_and_the_status_says_rolled_out(
        cluster: Cluster, start_operator: StartOperator, postfix_pod: LocalInstance,
        audit: AuditLog, operator_identity: Identity) -> None:
    ns = cluster.ns
    start_operator()
    cluster.apply(policy("p", ns, destinations=["a.example"], level="encrypt"))
    until(lambda: postfix_pod.query("a.example") == "encrypt", 30, what="installed in Postfix")
    ready = until(lambda: (c := cluster.condition("p", "Ready")) and c["status"] == "True"
                  and c, 30, what="Ready=True")
    assert ready["reason"] == "RolledOut" and "1/1" in ready["message"], ready
    cluster.apply(policy("p", ns, destinations=["a.example"], level="may"))
    until(lambda: postfix_pod.query("a.example") == "may", 30, what="the update installed")
    until(lambda: (c := cluster.condition("p", "Ready")) and c["status"] == "True"
          and c["observedGeneration"] == 2, 30, what="Ready of generation 2")
    audit.barrier()
    assert audit.count(None, "pods", subresource="exec") == 0
