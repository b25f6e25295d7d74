"""A rollout end to end through the real kube-apiserver: ``mailtls run`` writes the table,
a real ``mailtls agent`` process (the sidecar of a Pod object the test created and marked
Running) installs it into a local Postfix and reports in its pod's annotations, and the
policy's status says RolledOut. No exec: the agent strategy needs none (exec through the
API server needs a kubelet, which this control plane has not)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import LocalInstance
from testbed.controlplane import ControlPlane, Identity
from testbed.instance import postfix_unavailable
from testbed.layout import InstanceSettings

from .audit import AuditLog
from .conftest import StartOperator
from .helpers import Cluster, agent_pod, policy, until

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
    try:
        with agent_pod(controlplane, cluster, inst, tmp_path, "--observe-interval", "0"):
            yield inst
    finally:
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
