"""The chart's privileges on a real API server: render, apply, and ask with a token.

The chart is rendered by Helm's own Go code (helm-python-sdk, as tests/contract does)
for one release in one namespace; only what grants or limits rights is applied
(ServiceAccounts, Roles, bindings, the agent's ValidatingAdmissionPolicy), so the
server's RBAC authorizer and admission chain decide every request a test makes with
the operator's or an agent's token. Answers are kept as the server gave them (status
code, reason, message) so that a test asserts them and the report can quote them.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.contract.kit import CHART, parse_docs

Obj = dict[str, Any]

#: Kinds that grant or limit rights; Deployments, Services, CRDs etc. are left out.
PRIVILEGE_KINDS = frozenset({
    "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
    "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"})
CLUSTER_KINDS = frozenset({"ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
                           "ValidatingAdmissionPolicyBinding"})
MERGE = "application/merge-patch+json"


def render(values: dict[str, Any], *, release: str, namespace: str) -> list[Obj]:
    """Every object of ``helm template RELEASE -n NAMESPACE`` with these values."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=release, namespace=namespace, is_install=True)
    return [doc for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")
            for doc in parse_docs(text)]


def privileges(objects: list[Obj]) -> list[Obj]:
    """The rendered objects that decide what a token may do (each once: the chart renders
    the agent's ServiceAccount once per instance, also twice in one namespace)."""
    seen: set[tuple[str, str, str]] = set()
    out: list[Obj] = []
    for obj in objects:
        meta = obj["metadata"]
        key = (obj["kind"], meta.get("namespace", ""), meta["name"])
        if obj["kind"] in PRIVILEGE_KINDS and key not in seen:
            seen.add(key)
            out.append(obj)
    return out


def operator_args(objects: list[Obj]) -> list[str]:
    """The operator container's arguments exactly as the chart's Deployment gives them."""
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    [container] = [c for c in deployment["spec"]["template"]["spec"]["containers"]
                   if c["name"] == "operator"]
    return list(container["args"])


def to_yaml(objects: list[Obj]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


@dataclass(frozen=True)
class Answer:
    """What the server said to one request."""

    status: int
    reason: str
    message: str
    body: Obj

    def line(self) -> str:
        return f"{self.status} {self.reason}: {self.message}"


class Caller:
    """Raw HTTPS requests to the API server with one bearer token: nothing between the
    test and the server's answer (no client-side retries, no error rewording)."""

    def __init__(self, url: str, ca_file: Path, token: str) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.context = ssl.create_default_context(cafile=str(ca_file))

    def __call__(self, method: str, path: str, body: Obj | None = None,
                 content_type: str = "application/json") -> Answer:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=30) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {"message": raw.decode(errors="replace")[:500]}
        if not isinstance(parsed, dict):
            parsed = {}
        reason = parsed.get("reason", "") if parsed.get("kind") == "Status" else ""
        message = parsed.get("message", "") if parsed.get("kind") == "Status" else ""
        return Answer(status, str(reason), str(message), parsed)

    def can(self, verb: str, resource: str, *, group: str = "", namespace: str = "",
            subresource: str = "", name: str = "") -> tuple[bool, str]:
        """A SelfSubjectAccessReview: does the authorizer allow this token the request?"""
        attrs = {"verb": verb, "resource": resource, "group": group, "namespace": namespace,
                 "subresource": subresource, "name": name}
        answer = self("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                      {"apiVersion": "authorization.k8s.io/v1",
                       "kind": "SelfSubjectAccessReview",
                       "spec": {"resourceAttributes": {k: v for k, v in attrs.items() if v}}})
        if answer.status != 201:
            raise AssertionError(f"SelfSubjectAccessReview failed: {answer.line()}")
        status = answer.body["status"]
        return bool(status.get("allowed")), str(status.get("reason", ""))

    def whoami(self) -> Obj:
        """The user the server sees (SelfSubjectReview): name, groups and extra."""
        answer = self("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                      {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
        if answer.status != 201:
            raise AssertionError(f"SelfSubjectReview failed: {answer.line()}")
        user: Obj = answer.body["status"]["userInfo"]
        return user


def forbidden_message(user: str, verb: str, resource: str, *, group: str = "",
                      namespace: str = "", name: str = "") -> str:
    """The start of the authorizer's 403 message as kube-apiserver words it
    (endpoints/handlers/responsewriters: forbiddenMessage inside NewForbidden)."""
    qualified = resource.split("/")[0] + (f".{group}" if group else "")
    what = f'{qualified} "{name}"' if name else qualified
    scope = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
    return (f'{what} is forbidden: User "{user}" cannot {verb} resource "{resource}" '
            f'in API group "{group}"{scope}')


def namespace_obj(name: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def pod(namespace: str, name: str, *, instance: str, annotations: dict[str, str] | None = None,
        service_account: str | None = None, owner: Obj | None = None) -> Obj:
    """A Postfix pod as an API object: bound to a node that does not exist (no kubelet
    runs here), so nothing ever runs it; the test sets what it needs."""
    spec: Obj = {"nodeName": "no-such-node",
                 "containers": [{"name": "postfix", "image": "postfix:test"}]}
    if service_account:
        spec["serviceAccountName"] = service_account
    meta: Obj = {"name": name, "namespace": namespace,
                 "labels": {"mailtls.io/instance": instance},
                 "annotations": dict(annotations or {})}
    if owner:
        meta["ownerReferences"] = [owner]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def statefulset(namespace: str, name: str) -> Obj:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"matchLabels": labels}, "serviceName": name,
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "postfix",
                                                           "image": "postfix:test"}]}}}}


def policy(namespace: str, name: str, destinations: list[str], level: str,
           instances: list[str]) -> Obj:
    return {"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"destinations": destinations, "level": level, "instances": instances}}
