"""Events are for people: one Warning per condition that turned bad, however a real
server orders the watch events of our own status writes.

A burst makes the server's watch deliver a policy's older versions after the
operator has patched its status; read as they come, they made a status look unwritten
and its Warning look new, so the same Event was posted again (seen: up to three per
policy, 333 for 1,000 policies in `make bench`)."""

from __future__ import annotations

from collections import Counter

import pytest

from testbed.controlplane import Identity

from .audit import AuditLog
from .conftest import StartOperator
from .helpers import PLURAL, Cluster, policy, until

pytestmark = pytest.mark.cluster


def test_a_burst_of_conflicts_gets_exactly_one_warning_event_per_losing_policy(
        cluster: Cluster, start_operator: StartOperator, audit: AuditLog,
        operator_identity: Identity) -> None:
    ns, pairs, user = cluster.ns, 100, operator_identity.user
    start_operator()
    audit.mark()
    objs = [policy(f"win{i:03d}", ns, destinations=[f"d{i}.example"], level="encrypt")
            for i in range(pairs)]
    objs += [policy(f"lose{i:03d}", ns, destinations=[f"d{i}.example"], level="may")
             for i in range(pairs)]
    cluster.apply_many(objs)
    until(lambda: len(cluster.table() or []) == pairs, 60, what=f"{pairs} entries")
    until(lambda: sum(1 for (reason, _) in cluster.policy_events() if reason == "Conflict")
          >= pairs, 60, what="a Conflict event for every loser", every=0.5)
    # the last status patch is followed by its Event at once: after every status is
    # written and the server has logged all we sent, no further Event is on its way
    until(lambda: all(cluster.condition(o["metadata"]["name"], "Ready") for o in objs), 60,
          what="every status", every=0.5)
    audit.barrier()
    events = Counter(cluster.policy_events())
    assert events == Counter({("Conflict", f"lose{i:03d}"): 1 for i in range(pairs)})
    created = audit.count("create", "events", user=user)
    assert created == pairs, created
    patches = audit.count("patch", PLURAL, subresource="status", user=user)
    assert patches <= 1.1 * 2 * pairs, patches
