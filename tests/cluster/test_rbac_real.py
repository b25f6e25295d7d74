"""Least privilege, decided by the real authorizer and admission chain of kube-apiserver.

The chart is rendered with Helm's own code for each scope (all namespaces, or
watchNamespaces) and each strategy (exec, restart, agent), and only its ServiceAccounts,
Roles, bindings and admission policy are applied.  The operator then runs as its
ServiceAccount (a TokenRequest token, nothing else): everything it does must succeed,
and what it must never do is answered 403 by the server.  The agent's side is in
test_agent_admission_real.py.

Every refusal is asserted as the server words it (status, reason, message start) and
printed (``pytest -s``) so that the answers can be quoted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes.client
import pytest

from mailtls_operator.render import REVISION_KEY
from testbed.controlplane import ControlPlane
from testbed.wait import until
from tests.cluster.operating.audit import AuditLog
from tests.cluster.rbac_kit import (
    MERGE,
    Answer,
    forbidden_message,
    pod,
    policy,
    statefulset,
)
from tests.cluster.rbac_setup import Install, installed, running_operator
from tests.contract.kit import operator_grants

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
SCOPES = ("cluster", "namespaced")
STRATEGIES = ("exec", "restart", "agent")
CRD = "mailtlspolicies.mailtls.io"
CRD_PATH = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD}"
DRY = "?dryRun=All"  # a refusal that would wrongly succeed changes nothing
#: A refusal in the operator's log: the status code as a word, or the reason.
REFUSED = re.compile(r"\b403\b|forbidden", re.IGNORECASE)
#: Granted, and used by a code path this scenario does not reach, each for a reason.
NOT_REACHED = {
    ("", "pods/exec", "create"): "exec needs a kubelet: the exec runner goes through the "
                                 "server in test_exec_through_apiserver.py (kwok)",
    ("", "pods/exec", "get"): "the websocket upgrade of an exec is a GET (likewise)",
    ("", "pods", "patch"): "the applied-revision annotation after an exec rollout: the pod "
                           "here has the restart strategy",
    ("apps", "deployments", "get"): "restart strategy with a Deployment owner (a StatefulSet "
                                    "here)",
    ("apps", "deployments", "patch"): "restart strategy with a Deployment owner",
    ("apps", "replicasets", "get"): "a Deployment pod's owner is its ReplicaSet",
    ("mailtls.io", "mailtlsdiscoveries/status", "patch"): "no MailTLSDiscovery here: its "
        "status is written in tests/postfix/test_discovery_operator.py",
}


def record(case: str, answer: Answer | str) -> None:
    """One server answer for the report (shown with ``pytest -s``)."""
    print(f"RBAC | {case} | {answer.line() if isinstance(answer, Answer) else answer}")


@pytest.fixture(params=[(s, t) for s in SCOPES for t in STRATEGIES],
                ids=[f"{s}-{t}" for s in SCOPES for t in STRATEGIES])
def install(request: pytest.FixtureRequest, controlplane: ControlPlane,
            namespace: str) -> Iterator[Install]:
    controlplane.apply_crds(sorted((ROOT / "crds").glob("*.yaml")))
    scope, strategy = request.param
    with installed(controlplane, namespace, scope, strategy) as inst:
        yield inst


def _seed_instance(cp: ControlPlane, ns: str) -> None:
    """Postfix instance "relay": a StatefulSet and its pod (restart strategy, so the
    operator reads the owner and patches its template), never Ready (no kubelet)."""
    sts = cp.request("POST", f"/apis/apps/v1/namespaces/{ns}/statefulsets",
                     statefulset(ns, "relay"))
    owner = {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "relay",
             "uid": sts["metadata"]["uid"], "controller": True}
    cp.request("POST", f"/api/v1/namespaces/{ns}/pods",
               pod(ns, "relay-0", instance="relay",
                   annotations={"mailtls.io/strategy": "restart"}, owner=owner))


def _table(cp: ControlPlane, ns: str, instance: str) -> set[str] | None:
    """The entries of an instance's table ConfigMap, or None while it does not exist."""
    found = cp.request("GET", f"/api/v1/namespaces/{ns}/configmaps?fieldSelector="
                       f"metadata.name%3D{instance}-mailtls")["items"]
    if not found:
        return None
    text = (found[0].get("data") or {}).get("tls_policy", "")
    return {line for line in text.splitlines()
            if line and not line.startswith(("#", REVISION_KEY))}


def _condition(cp: ControlPlane, ns: str, name: str, kind: str) -> dict[str, Any] | None:
    obj = cp.request("GET", f"/apis/mailtls.io/v1alpha1/namespaces/{ns}/mailtlspolicies/{name}")
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return dict(cond)
    return None


def test_operator_does_its_whole_job_with_only_the_charts_rights(
        install: Install, tmp_path: Path) -> None:
    cp, ns = install.cp, install.watched
    policies = f"/apis/mailtls.io/v1alpha1/namespaces/{ns}/mailtlspolicies"
    _seed_instance(cp, ns)
    with cp.api_client() as admin:
        audit = AuditLog(cp.audit_log, admin) if cp.audit_log else None
        if audit:
            audit.mark()
    with running_operator(install, tmp_path) as op:
        cp.request("POST", policies, policy(ns, "p", ["a.example"], "encrypt", []))
        cp.request("POST", policies, policy(ns, "named", ["b.example"], "may", ["lonely"]))
        cp.request("POST", policies, policy(ns, "loser", ["b.example"], "none", ["lonely"]))
        try:
            until(lambda: _table(cp, ns, "lonely") == {"a.example encrypt", "b.example may"},
                  60, "the ConfigMap lonely-mailtls")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the operator's log:\n{op.text()[-6000:]}") from exc
        until(lambda: (c := _condition(cp, ns, "loser", "Accepted"))
              and c["reason"] == "Conflict", 30, "status of the conflicting policy")
        until(lambda: _table(cp, ns, "relay") == {"a.example encrypt"}, 30, "relay-mailtls")
        # restart strategy: the owner's pod template carries the revision
        until(lambda: "mailtls.io/revision" in (cp.request(
            "GET", f"/apis/apps/v1/namespaces/{ns}/statefulsets/relay")["spec"]["template"]
            ["metadata"].get("annotations") or {}), 30, "the StatefulSet template patched")
        cp.kubectl("patch", "mailtlspolicies.mailtls.io", "p", "-n", ns, "--type=merge",
                   "-p", '{"spec": {"level": "secure", "match": ["nexthop"]}}')
        until(lambda: _table(cp, ns, "relay") == {"a.example secure match=nexthop"}, 30,
              "relay-mailtls patched")
        cp.request("DELETE", f"{policies}/loser")
        cp.request("DELETE", f"{policies}/named")  # "lonely" has no pods: ConfigMap deleted
        until(lambda: _table(cp, ns, "lonely") is None, 30, "lonely-mailtls deleted")
        events = cp.request("GET", f"/api/v1/namespaces/{ns}/events")["items"]
        lease = cp.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/"
                                  f"{install.release_ns}/leases/{install.lease}")
    log = op.text()
    assert op.proc.returncode == 0, log
    assert {e["involvedObject"]["kind"] for e in events} >= {"MailTLSPolicy"}
    assert lease["spec"].get("holderIdentity"), lease
    # Other tests' namespaces stay Terminating with their content (no namespace
    # controller): a cluster-wide operator may be refused writes there for that reason,
    # which is the namespace lifecycle, not RBAC.
    refused = [line for line in log.splitlines()
               if REFUSED.search(line) and "because it is being terminated" not in line]
    assert refused == [], "the server refused the operator:\n" + "\n".join(refused)
    record(f"{install.scope}/{install.strategy} operator run",
           f"{len(log.splitlines())} log lines, no 403; {len(events)} Events")
    if audit is not None:  # and every right the chart grants is one the operator used
        with cp.api_client() as admin:
            audit.core = kubernetes.client.CoreV1Api(admin)
            audit.barrier()
        used = {(_group(r.uri), r.resource + (f"/{r.subresource}" if r.subresource else ""),
                 r.verb) for r in audit.select(user=install.user, subresource="*") if r.resource}
        grants = {g[1:4] for g in operator_grants(install.objects, install.service_account,
                                                  install.release_ns)}
        assert used - grants == set(), "calls the chart does not grant"
        assert grants - used - set(NOT_REACHED) == set(), "grants no code path here used"


def _group(uri: str) -> str:
    """The API group of a request by its path: ``/apis/GROUP/...``, or core ``/api/v1``."""
    parts = urlsplit(uri).path.split("/")
    return parts[2] if len(parts) > 2 and parts[1] == "apis" else ""


def _needs(install: Install) -> list[tuple[str, str, str, str, str]]:
    """(verb, group, resource, namespace, name): every call the operator makes, written
    from the code's needs, not copied from the chart.  Cluster-wide, list/watch/create
    are asked at the cluster scope (namespace "": every namespace)."""
    ns = "" if install.scope == "cluster" else install.watched
    out = [(v, "mailtls.io", "mailtlspolicies", ns, "") for v in ("list", "watch")]
    out += [(v, "mailtls.io", "mailtlsdiscoveries", ns, "") for v in ("list", "watch")]
    out += [("patch", "mailtls.io", f"{r}/status", install.watched, "x")
            for r in ("mailtlspolicies", "mailtlsdiscoveries")]
    out += [(v, "", "pods", ns, "") for v in ("list", "watch")]
    out += [(v, "", "configmaps", ns, "") for v in ("list", "watch", "create")]
    out += [(v, "", "configmaps", install.watched, "relay-mailtls")
            for v in ("get", "patch", "delete")]
    out += [(v, "apps", r, install.watched, "relay") for r in ("deployments", "statefulsets")
            for v in ("get", "patch")]
    out += [("get", "apps", "replicasets", install.watched, "relay-1"),
            ("create", "", "events", install.watched, ""),
            ("get", "apiextensions.k8s.io", "customresourcedefinitions", "", CRD),
            ("create", "coordination.k8s.io", "leases", install.release_ns, ""),
            ("get", "coordination.k8s.io", "leases", install.release_ns, install.lease),
            ("patch", "coordination.k8s.io", "leases", install.release_ns, install.lease)]
    if install.strategy != "agent":
        out.append(("patch", "", "pods", install.watched, "relay-0"))
    if install.strategy == "exec":
        out += [(v, "", "pods/exec", install.watched, "relay-0") for v in ("create", "get")]
    return out


def test_every_call_the_operator_needs_is_allowed_by_the_authorizer(
        install: Install, tmp_path: Path) -> None:
    op = install.operator()
    denied = []
    for verb, group, resource, ns, name in _needs(install):
        res, _, sub = resource.partition("/")
        allowed, reason = op.can(verb, res, group=group, namespace=ns, subresource=sub,
                                 name=name)
        if not allowed:
            denied.append((verb, group, resource, ns, name, reason))
    assert denied == []
    kubeconfig = install.cp.kubeconfig_for_token(op.token, tmp_path / "operator.kubeconfig")
    listing = install.cp.kubectl(f"--kubeconfig={kubeconfig}", "auth", "can-i", "--list",
                                 f"--namespace={install.watched}")
    record(f"{install.scope}/{install.strategy} can-i --list -n watched",
           " ; ".join(line.strip() for line in listing.stdout.splitlines()))


def _refusals(install: Install) -> list[tuple[str, str, str, dict[str, Any] | None, str, dict[
        str, str]]]:
    """(case, method, path, body, content type, forbidden_message kwargs)."""
    ns, api = install.watched, "/api/v1/namespaces"
    cases: list[tuple[str, str, str, dict[str, Any] | None, str, dict[str, str]]] = [
        ("list Secrets", "GET", f"{api}/{ns}/secrets", None, "",
         {"verb": "list", "resource": "secrets", "namespace": ns}),
        ("get a Secret", "GET", f"{api}/{ns}/secrets/smtp-key", None, "",
         {"verb": "get", "resource": "secrets", "namespace": ns, "name": "smtp-key"}),
        ("delete a pod", "DELETE", f"{api}/{ns}/pods/relay-0{DRY}", None, "",
         {"verb": "delete", "resource": "pods", "namespace": ns, "name": "relay-0"}),
        ("patch the CRD", "PATCH", CRD_PATH + DRY, {"metadata": {"labels": {"x": "y"}}},
         MERGE, {"verb": "patch", "resource": "customresourcedefinitions",
                 "group": "apiextensions.k8s.io", "name": CRD}),
        ("delete the CRD", "DELETE", CRD_PATH + DRY, None, "",
         {"verb": "delete", "resource": "customresourcedefinitions",
          "group": "apiextensions.k8s.io", "name": CRD}),
        ("create a CRD", "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
         + DRY, {"apiVersion": "apiextensions.k8s.io/v1",
                 "kind": "CustomResourceDefinition", "metadata": {"name": "x.example.com"}},
         "application/json", {"verb": "create", "resource": "customresourcedefinitions",
                              "group": "apiextensions.k8s.io"}),
        ("write a policy's spec", "PATCH",
         f"/apis/mailtls.io/v1alpha1/namespaces/{ns}/mailtlspolicies/p{DRY}",
         {"spec": {"level": "none"}}, MERGE,
         {"verb": "patch", "resource": "mailtlspolicies", "group": "mailtls.io",
          "namespace": ns, "name": "p"}),
        ("create a Lease outside the release namespace", "POST",
         f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases{DRY}",
         {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
          "metadata": {"name": "x"}}, "application/json",
         {"verb": "create", "resource": "leases", "group": "coordination.k8s.io",
          "namespace": ns}),
        ("list nodes", "GET", "/api/v1/nodes", None, "",
         {"verb": "list", "resource": "nodes"}),
    ]
    if install.strategy != "exec":
        cases.append(("exec into a pod", "POST",
                      f"{api}/{ns}/pods/relay-0/exec?command=postconf&container=postfix"
                      "&stdout=true", None, "",
                      {"verb": "create", "resource": "pods/exec", "namespace": ns,
                       "name": "relay-0"}))
    if install.strategy == "agent":
        cases.append(("patch a pod (agent strategy)", "PATCH", f"{api}/{ns}/pods/relay-0{DRY}",
                      {"metadata": {"annotations": {"mailtls.io/applied-revision": "x"}}},
                      MERGE, {"verb": "patch", "resource": "pods", "namespace": ns,
                              "name": "relay-0"}))
    if install.scope == "namespaced":
        off = install.outside
        cases += [
            ("create a ConfigMap outside the watched namespaces", "POST",
             f"{api}/{off}/configmaps{DRY}", {"apiVersion": "v1", "kind": "ConfigMap",
                                              "metadata": {"name": "relay-mailtls"}},
             "application/json", {"verb": "create", "resource": "configmaps",
                                  "namespace": off}),
            ("list pods outside the watched namespaces", "GET", f"{api}/{off}/pods", None,
             "", {"verb": "list", "resource": "pods", "namespace": off}),
            ("list policies cluster-wide", "GET", "/apis/mailtls.io/v1alpha1/mailtlspolicies",
             None, "", {"verb": "list", "resource": "mailtlspolicies",
                        "group": "mailtls.io"}),
        ]
    return cases


def test_what_the_operator_must_not_do_is_refused_403_by_the_server(
        install: Install) -> None:
    cp, ns = install.cp, install.watched
    _seed_instance(cp, ns)
    cp.request("POST", f"/apis/mailtls.io/v1alpha1/namespaces/{ns}/mailtlspolicies",
               policy(ns, "p", ["a.example"], "encrypt", []))
    op = install.operator()
    wrong = []
    for case, method, path, body, ctype, expect in _refusals(install):
        answer = op(method, path, body, ctype or "application/json")
        record(f"{install.scope}/{install.strategy} operator: {case}", answer)
        message = forbidden_message(install.user, **expect)
        if (answer.status, answer.reason) != (403, "Forbidden") or \
                not answer.message.startswith(message):
            wrong.append((case, answer.line(), message))
    assert wrong == []
    if install.strategy == "exec":  # allowed: past the authorizer, then no kubelet to reach
        answer = op("POST", f"/api/v1/namespaces/{ns}/pods/relay-0/exec?command=postconf"
                    "&container=postfix&stdout=true")
        record(f"{install.scope}/exec operator: exec into a pod (granted)", answer)
        assert answer.status != 403, answer.line()


def test_an_exec_refused_by_rbac_is_never_read_as_tafile_present(
        controlplane: ControlPlane, namespace: str, tmp_path: Path) -> None:
    """A chart installed for the restart strategy (no ``pods/exec``) meets a pod annotated
    ``exec``: the server answers the tafile check 403, and the operator holds the policy
    that names the file back instead of taking the refusal for a file present.  (Its
    Ready says RolloutFailed, not CheckUnavailable: the rollout's own exec is refused by
    the same 403, and that condition leads.)"""
    controlplane.apply_crds(sorted((ROOT / "crds").glob("*.yaml")))
    with installed(controlplane, namespace, "namespaced", "restart") as install:
        cp, ns = install.cp, install.watched
        cp.request("POST", f"/api/v1/namespaces/{ns}/pods",
                   pod(ns, "relay-0", instance="relay",
                       annotations={"mailtls.io/strategy": "exec"},
                       owner={"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs",
                              "uid": "0b1e5c3a-0000-4000-8000-000000000001"}))
        cp.kubectl("patch", "pod", "relay-0", "-n", ns, "--subresource=status", "--type=merge",
                   "-p", '{"status": {"phase": "Running", "conditions": '
                         '[{"type": "Ready", "status": "True"}]}}')
        policies = f"/apis/mailtls.io/v1alpha1/namespaces/{ns}/mailtlspolicies"
        with running_operator(install, tmp_path) as op:
            anchored = policy(ns, "anchored", ["a.example"], "secure", [])
            anchored["spec"].update(match=["nexthop"], tafile=["/etc/postfix/tls/ca.pem"])
            cp.request("POST", policies, anchored)
            cp.request("POST", policies, policy(ns, "plain", ["b.example"], "encrypt", []))
            until(lambda: _table(cp, ns, "relay") == {"b.example encrypt"}, 30,
                  "the table without the held-back policy")
            status = until(lambda: (s := cp.request("GET", f"{policies}/anchored").get(
                "status")) and s.get("observedGeneration") == 1 and s, 30,
                "the anchored policy's status")
            until(lambda: "cannot check tafile /etc/postfix/tls/ca.pem" in op.text(), 30,
                  "the refused check in the log")
            log = op.text()
    assert status["entries"] == []  # held back: not one line of it in the table
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and "403" in ready["message"], ready
    checks = [line for line in log.splitlines() if "cannot check tafile" in line]
    assert all(REFUSED.search(line) for line in checks), checks
