"""Two ``mailtls run --leader-elect`` replicas on a real Lease (issue 23, item 5): the
leader is killed without a chance to release the Lease, the standby takes over within a
lease period, and no table revision is ever written twice; a leader stopped cleanly
releases the Lease and the standby takes it at once."""

from __future__ import annotations

import re
import time

import pytest

from testbed.controlplane import Identity

from .audit import WRITE_VERBS, AuditLog
from .conftest import StartOperator
from .helpers import Cluster, OperatorProcess, policy, until

pytestmark = pytest.mark.cluster

LEASE_SECONDS, RENEW_EVERY = 15.0, 5.0  # mailtls run's defaults (mailtls_operator.leader)


def _leader_and_standby(cluster: Cluster,
                        start_operator: StartOperator) -> tuple[OperatorProcess, OperatorProcess]:
    """replica-a leading (its table written), replica-b started after it and standing by."""
    elect = ("--leader-elect", "--lease-namespace", cluster.ns)
    a = start_operator(*elect, name="replica-a", env={"POD_NAME": "replica-a"})
    a.wait_log(r"leading as replica-a", 30)
    b = start_operator(*elect, name="replica-b", env={"POD_NAME": "replica-b"})
    cluster.apply(policy("p", cluster.ns, destinations=["a.example"], level="may"))
    until(lambda: cluster.table() == ["a.example may"], what="the leader's table")
    assert cluster.lease()["spec"]["holderIdentity"] == "replica-a"
    assert "leading as" not in b.text()
    return a, b


def test_the_standby_takes_over_a_killed_leader_within_the_lease_and_no_revision_twice(
        cluster: Cluster, start_operator: StartOperator, audit: AuditLog,
        operator_identity: Identity) -> None:
    ns = cluster.ns
    a, b = _leader_and_standby(cluster, start_operator)
    a.kill()  # SIGKILL: the Lease is not released, it must run out
    killed = time.monotonic()
    cluster.apply(policy("p", ns, destinations=["a.example"], level="encrypt"))
    b.wait_log(r"leading as replica-b", LEASE_SECONDS + RENEW_EVERY + 5)
    takeover = time.monotonic() - killed
    assert takeover <= LEASE_SECONDS + RENEW_EVERY, takeover
    until(lambda: cluster.table() == ["a.example encrypt"], 20, what="the new leader's table")
    until(lambda: (c := cluster.condition("p", "Ready")) and c["observedGeneration"] == 2,
          20, what="status of generation 2")
    spec = cluster.lease()["spec"]
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("replica-b", 1)

    # every table the replicas wrote, by revision: each exactly once, and the server
    # saw exactly those writes
    written = [m.group(1) for proc in (a, b) for m in
               re.finditer(rf"ConfigMap {ns}/relay-mailtls: revision (\S+)", proc.text())]
    assert len(written) == len(set(written)) == 2, written
    audit.barrier()
    writes = audit.select(WRITE_VERBS, "configmaps", user=operator_identity.user)
    assert len(writes) == len(written), [(r.verb, r.name, r.code) for r in writes]
    print(f"takeover after SIGKILL: {takeover:.1f} s")


def test_a_leader_stopped_cleanly_releases_the_lease_and_the_standby_takes_it_at_once(
        cluster: Cluster, start_operator: StartOperator) -> None:
    ns = cluster.ns
    a, b = _leader_and_standby(cluster, start_operator)
    assert a.stop() == 0  # SIGTERM: the Lease is handed over before the process ends
    stopped = time.monotonic()
    b.wait_log(r"leading as replica-b", LEASE_SECONDS)
    takeover = time.monotonic() - stopped
    # a Lease left to run out could be taken no sooner than LEASE - RENEW after the
    # leader's last renewal; the standby polls every RENEW/2
    assert takeover < LEASE_SECONDS - RENEW_EVERY, takeover
    assert cluster.lease()["spec"]["holderIdentity"] == "replica-b"
    cluster.apply(policy("p", ns, destinations=["a.example"], level="encrypt"))
    until(lambda: cluster.table() == ["a.example encrypt"], 20, what="the new leader's table")
    print(f"takeover after a clean stop: {takeover:.1f} s")
