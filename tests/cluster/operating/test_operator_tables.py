"""``mailtls run`` against the real kube-apiserver: the tables it writes per instance, the
status it reports through the /status subresource, conflicts and refusals, updates and
deletes, a hand edit undone, an exception that expires by the wall clock, a table past
the server's 1 MiB ConfigMap limit split into parts and back, and the restart strategy
rolled out without a single exec."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mailtls_operator.configmap import reassemble
from mailtls_operator.render import REVISION_KEY
from mailtls_operator.world import ANN_TEMPLATE_REVISION
from testbed.controlplane import Identity
from tests.cluster.rbac_kit import pod, statefulset

from .audit import WRITE_VERBS, AuditLog
from .conftest import StartOperator
from .helpers import PLURAL, Cluster, policy, until

pytestmark = pytest.mark.cluster


def test_create_update_delete_give_exact_configmap_content(
        cluster: Cluster, start_operator: StartOperator) -> None:
    ns = cluster.ns
    start_operator()
    cluster.apply(policy("example-com", ns, destinations=["Example.com", ".example.com"],
                         level="secure", match=["nexthop", "dot-nexthop"]))
    cluster.apply(policy("partner", ns, destinations=["bücher.example"], level="encrypt",
                         protocols=">=TLSv1.2"))
    want = [".example.com secure match=nexthop:dot-nexthop",
            "bücher.example encrypt protocols=>=TLSv1.2",
            "example.com secure match=nexthop:dot-nexthop",
            "xn--bcher-kva.example encrypt protocols=>=TLSv1.2"]
    until(lambda: cluster.table() == want, what="both policies in the table")
    cm = cluster.configmap()
    assert cm is not None
    text = cm["data"]["tls_policy"]
    revision = cm["metadata"]["annotations"]["mailtls.io/revision"]
    assert f"# revision: {revision}\n" in text
    assert f"\n{REVISION_KEY} secure match=rev-{revision[:16]}\n" in text
    assert f"# {ns}/example-com\n.example.com secure" in text
    assert cm["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "mailtls-operator",
                                        "mailtls.io/instance": "relay"}

    cluster.apply(policy("partner", ns, destinations=["bücher.example"], level="may"))
    until(lambda: "bücher.example may" in (cluster.table() or []), what="the update")
    cluster.delete("example-com")
    until(lambda: cluster.table() == ["bücher.example may", "xn--bcher-kva.example may"],
          what="the delete")
    ready = until(lambda: cluster.condition("partner", "Ready"), what="Ready of partner")
    assert ready["reason"] in ("RolledOut", "Pending")
    cluster.delete("partner")  # no pods and no policy: the instance is gone
    until(lambda: cluster.configmap() is None, what="the ConfigMap deleted")


def test_conflicts_resolve_per_namespace_and_instance_and_the_loser_is_told(
        cluster: Cluster, start_operator: StartOperator) -> None:
    ns, other = cluster.ns, f"{cluster.ns}-other"
    cluster.ensure_namespace(other)
    start_operator(namespaces=[ns, other])
    cluster.apply(policy("weak", ns, destinations=["a.example"], level="may"))
    cluster.apply(policy("strong", ns, destinations=["a.example"], level="encrypt"))
    cluster.apply(policy("elsewhere", other, destinations=["a.example"], level="none"))
    cluster.apply(policy("edge-only", ns, destinations=["a.example"], level="none",
                         instances=["edge"]))
    until(lambda: cluster.table() == ["a.example encrypt"], what="the strong entry")
    until(lambda: cluster.table(namespace=other) == ["a.example none"], what="other ns")
    until(lambda: cluster.table("edge") == ["a.example none"], what="instance edge")
    accepted = until(lambda: (c := cluster.condition("weak", "Accepted"))
                     and c["status"] == "False" and c, what="weak refused")
    assert accepted["reason"] == "Conflict"
    assert f"{ns}/strong" in accepted["message"]
    for name in ("strong", "edge-only"):
        until(lambda n=name: _accepted(cluster, n), what=f"{name} accepted")  # type: ignore[misc]
    until(lambda: (c := cluster.condition("elsewhere", "Accepted", other))
          and c["status"] == "True", what="elsewhere accepted")
    until(lambda: cluster.status("strong").get("entries") == ["a.example encrypt"])
    assert cluster.status("weak")["entries"] == []
    until(lambda: ("Conflict", "weak") in cluster.policy_events(), what="the Conflict event")


def test_what_the_server_accepts_but_the_operator_refuses_is_reported_in_status(
        cluster: Cluster, start_operator: StartOperator, audit: AuditLog,
        operator_identity: Identity) -> None:
    ns = cluster.ns
    now = datetime.now(UTC).replace(microsecond=0)
    start_operator("--max-exception-days", "7")
    cluster.apply(policy("partner", ns, destinations=["a.example"], level="encrypt"))
    until(lambda: cluster.table() == ["a.example encrypt"], what="the good table")
    good = cluster.configmap()
    # valid for the CRD's schema and CEL, too long for this operator's --max-exception-days
    cluster.apply(policy("too-long", ns, destinations=["b.example"], level="may",
                         exception={"startsAt": _z(now - timedelta(hours=1)),
                                    "expiresAt": _z(now + timedelta(days=20)),
                                    "reason": "INC-9 partner certificate expired"}))
    cond = until(lambda: (c := cluster.condition("too-long", "Accepted"))
                 and c["status"] == "False" and c, what="too-long refused")
    assert cond["reason"] == "Invalid" and "7" in cond["message"], cond
    ready = cluster.has("too-long", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Invalid")
    until(lambda: ("Invalid", "too-long") in cluster.policy_events(), what="Invalid event")
    assert cluster.table() == ["a.example encrypt"]
    cm = cluster.configmap()
    assert cm is not None and good is not None and cm["data"] == good["data"]
    audit.barrier()
    # every status write went through the /status subresource, never the main resource
    mine = audit.select(WRITE_VERBS, PLURAL, subresource="*", user=operator_identity.user)
    assert mine and all(r.subresource == "status" and r.verb == "patch" for r in mine), mine

    # a good policy changed into one the operator refuses: its last good generation stays
    cluster.apply(policy("partner", ns, destinations=["a.example"], level="may",
                         exception={"startsAt": _z(now - timedelta(hours=1)),
                                    "expiresAt": _z(now + timedelta(days=20)),
                                    "reason": "INC-10 partner certificate expired"}))
    ready = until(lambda: (c := cluster.condition("partner", "Ready"))
                  and c["reason"] == "Invalid" and c, what="partner's generation 2 refused")
    assert "generation 2 refused; the last good generation 1 stays" in ready["message"], ready
    assert cluster.table() == ["a.example encrypt"]


def test_an_exception_expires_by_itself_when_the_wall_clock_passes_it(
        cluster: Cluster, start_operator: StartOperator) -> None:
    ns = cluster.ns
    start_operator()
    now = datetime.now(UTC).replace(microsecond=0)
    expires = now + timedelta(seconds=8)
    cluster.apply(policy("secure", ns, destinations=["p.example"], level="secure",
                         match=["nexthop"]))
    cluster.apply(policy("break-glass", ns, destinations=["p.example"], level="may",
                         exception={"startsAt": _z(now - timedelta(minutes=1)),
                                    "expiresAt": _z(expires),
                                    "reason": "INC-7 partner certificate expired"}))
    until(lambda: cluster.table() == ["p.example may"], what="the exception in force")
    over = until(lambda: cluster.condition("secure", "Overridden"), what="Overridden")
    assert f"{ns}/break-glass" in over["message"]
    until(lambda: cluster.table() == ["p.example secure match=nexthop"], 20,
          what="the exception expired")
    assert datetime.now(UTC) >= expires
    expired = until(lambda: (c := cluster.condition("break-glass", "Ready"))
                    and c["reason"] == "Expired" and c, what="Ready=Expired")
    assert expired["status"] == "False"


def test_configmap_deleted_or_edited_by_hand_is_restored(
        cluster: Cluster, start_operator: StartOperator) -> None:
    ns = cluster.ns
    start_operator()
    cluster.apply(policy("p", ns, destinations=["a.example"], level="encrypt"))
    until(lambda: cluster.table() == ["a.example encrypt"], what="the table")
    good = cluster.configmap()
    assert good is not None
    cluster.core.delete_namespaced_config_map("relay-mailtls", ns)
    until(lambda: cluster.table() == ["a.example encrypt"], what="restored after delete")
    cluster.core.patch_namespaced_config_map(
        "relay-mailtls", ns, {"data": {"tls_policy": "a.example none\n"}})
    until(lambda: cluster.table() == ["a.example encrypt"], what="restored after edit")
    restored = cluster.configmap()
    assert restored is not None and restored["data"] == good["data"]


def test_a_table_past_the_configmap_limit_is_split_and_shrinks_back(
        cluster: Cluster, start_operator: StartOperator) -> None:
    ns, n, per = cluster.ns, 40, 1000  # 40,000 entries: ~3 MiB of text, ~1.7 MiB gzipped

    def dests(p: int) -> list[str]:  # hex names: gzip cannot shrink them much
        return [hashlib.sha256(f"{p}-{i}".encode()).hexdigest()[:48] + ".example"
                for i in range(per)]

    start_operator("--debounce", "0.3", "--max-delay", "10")
    cluster.apply_many((policy(f"bulk-{p}", ns, destinations=dests(p), level="encrypt")
                        for p in range(n)), workers=4)
    want = {f"{d} encrypt" for p in range(n) for d in dests(p)}

    def parts() -> list[dict[str, Any]]:
        listed = cluster.core.list_namespaced_config_map(
            ns, label_selector="app.kubernetes.io/managed-by=mailtls-operator").items
        return sorted((cluster.client.sanitize_for_serialization(cm) for cm in listed
                       if cm.metadata.name.startswith("relay-mailtls")),
                      key=lambda cm: cm["metadata"]["name"])

    def entries(bodies: list[dict[str, Any]]) -> set[str]:
        return {line for line in reassemble(bodies).splitlines()
                if line and not line.startswith(("#", REVISION_KEY))}

    bodies = until(lambda: (b := parts()) and len(b) > 1 and entries(b) == want and b, 120,
                   what=f"{n * per} entries in part ConfigMaps", every=1.0)
    # the server stored each: none is over its limit (a real 1 MiB check, not ours)
    assert all(len(json.dumps(b)) < 1024 * 1024 for b in bodies)
    revisions = {b["metadata"]["annotations"]["mailtls.io/revision"] for b in bodies}
    assert len(revisions) == 1, revisions
    for p in range(1, n):
        cluster.delete(f"bulk-{p}")
    until(lambda: len(parts()) == 1 and len(cluster.table() or []) == per, 60,
          what="back to one ConfigMap", every=0.5)
    assert set(cluster.table() or []) == {f"{d} encrypt" for d in dests(0)}


def test_the_restart_strategy_rolls_out_without_exec_and_keeps_an_empty_table(
        cluster: Cluster, start_operator: StartOperator, audit: AuditLog,
        operator_identity: Identity) -> None:
    """Pods with the restart strategy: no exec at all (not even for the tafile check); the
    owner's template carries the revision, the StatefulSet controller's rolling update is
    played by hand (no controller-manager runs here); with every policy deleted the
    instance still has pods, so it keeps an empty, valid table rather than none."""
    ns = cluster.ns
    sts = cluster.client.sanitize_for_serialization(
        cluster.apps.create_namespaced_stateful_set(ns, statefulset(ns, "relay")))
    owner = {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "relay",
             "uid": sts["metadata"]["uid"], "controller": True}
    for i in range(2):
        cluster.create_pod(pod(ns, f"relay-{i}", instance="relay", owner=owner,
                               annotations={"mailtls.io/strategy": "restart"}))
        cluster.mark_ready(f"relay-{i}")
    start_operator()
    cluster.apply(policy("anchored", ns, destinations=["a.example"], level="secure",
                         match=["nexthop"], tafile=["/etc/postfix/tls/ca.pem"]))
    line = "a.example secure match=nexthop tafile=/etc/postfix/tls/ca.pem"
    until(lambda: cluster.table() == [line], what="the table")

    def template_revision() -> str | None:
        got = cluster.apps.read_namespaced_stateful_set("relay", ns)
        return (got.spec.template.metadata.annotations or {}).get(ANN_TEMPLATE_REVISION)

    revision = until(template_revision, what="the template's revision")
    cm = cluster.configmap()
    assert cm is not None and cm["metadata"]["annotations"]["mailtls.io/revision"] == revision
    for i in range(2):  # the rolling update: each new pod carries the template's annotation
        cluster.core.patch_namespaced_pod(
            f"relay-{i}", ns, {"metadata": {"annotations": {ANN_TEMPLATE_REVISION: revision}}})
    ready = until(lambda: (c := cluster.condition("anchored", "Ready"))
                  and c["reason"] == "RolledOut" and c, 30, what="Ready=RolledOut")
    assert "not checked in relay: the restart strategy does not exec" in ready["message"]

    cluster.delete("anchored")
    until(lambda: cluster.table() == [], what="an empty table")
    cm = cluster.configmap()
    assert cm is not None  # the instance still has pods: an empty table, not none
    assert "mailtls-revision.invalid secure match=rev-" in cm["data"]["tls_policy"]
    audit.barrier()
    assert audit.count(None, "pods", subresource="exec") == 0
    assert audit.count(None, "pods", subresource="attach") == 0


def _accepted(cluster: Cluster, name: str) -> bool:
    cond = cluster.condition(name, "Accepted")
    return cond is not None and cond["status"] == "True"


def _z(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")
