"""``mailtls run`` against the real kube-apiserver: the tables it writes per instance, the
status it reports through the /status subresource, conflicts and refusals, updates and
deletes, a hand edit undone and an exception that expires by the wall clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mailtls_operator.render import REVISION_KEY

from .audit import WRITE_VERBS, AuditLog
from .conftest import Identity, StartOperator
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


def _accepted(cluster: Cluster, name: str) -> bool:
    cond = cluster.condition(name, "Accepted")
    return cond is not None and cond["status"] == "True"


def _z(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")
