"""Faults injected by the real kube-apiserver's own admission chain: a validating
admission webhook on loopback that refuses chosen writes of one user.

A webhook runs in the request's path before anything is stored, so a refused write
changes nothing, as when a real server fails; and the server answers the client with the
code the webhook gives (``admission/plugin/webhook/errors.ToStatusErr`` keeps any code
from 400 up): a 500, a 409 or a 422 here reaches the operator as the server's answer
would.  A webhook that answers later than its ``timeoutSeconds`` makes the server fail
the write itself ("failed calling webhook ... context deadline exceeded", with
``failurePolicy: Fail``): a hung dependency in the server's path.

Admission sees writes only (create, update -- a PATCH is an UPDATE --, delete), never
reads: faults on lists and watches are made otherwise (the API server stopped or
restarted, etcd compacted; see test_operator_faults.py).

The webhook configuration is scoped to one namespace (``namespaceSelector`` on
``kubernetes.io/metadata.name``), so no other test's writes pass through it, and is
deleted again on exit.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import kubernetes.client
import trustme

#: Every request the webhook is asked about (so that a probe shows it is armed).
RULES = [
    {"apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps"],
     "operations": ["CREATE", "UPDATE", "DELETE"], "scope": "Namespaced"},
    {"apiGroups": ["mailtls.io"], "apiVersions": ["v1alpha1"],
     "resources": ["mailtlspolicies", "mailtlspolicies/status"],
     "operations": ["CREATE", "UPDATE", "DELETE"], "scope": "Namespaced"},
]
PROBE = "mailtls-webhook-probe"
#: The Status reason a real server gives with each code.
REASONS = {409: "Conflict", 422: "Invalid", 500: "InternalError", 503: "ServiceUnavailable",
           504: "Timeout"}


@dataclass
class Fault:
    """Refuse the next ``times`` matching writes of the faulted user with ``code``, or
    answer them ``delay`` seconds late (past the webhook's timeout: the server fails them)."""

    resource: str  # "configmaps", "mailtlspolicies"
    operations: tuple[str, ...] = ("CREATE", "UPDATE")
    subresource: str = ""
    name: str | None = None
    code: int = 500
    times: int = 1
    delay: float = 0.0
    message: str = "injected by the test's admission webhook"
    hits: int = 0

    @property
    def exhausted(self) -> bool:
        return self.hits >= self.times

    def matches(self, request: dict[str, Any]) -> bool:
        return (not self.exhausted
                and request["resource"]["resource"] == self.resource
                and (request.get("subResource") or "") == self.subresource
                and request["operation"] in self.operations
                and (self.name is None or request.get("name") == self.name))


@dataclass
class FaultWebhook:
    """The webhook server and its configuration for one namespace and one user."""

    namespace: str
    user: str
    timeout_seconds: int = 2
    faults: list[Fault] = field(default_factory=list)
    #: (operation, resource/subresource, name, user, code answered) of every review
    seen: list[tuple[str, str, str, str, int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def inject(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def review(self, request: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """The AdmissionReview response for ``request`` and how long to wait first."""
        user = (request.get("userInfo") or {}).get("username", "")
        fault = None
        with self._lock:
            if user == self.user:
                fault = next((f for f in self.faults if f.matches(request)), None)
                if fault is not None:
                    fault.hits += 1
            code = fault.code if fault is not None and not fault.delay else 200
            resource = request["resource"]["resource"] + (
                f"/{request['subResource']}" if request.get("subResource") else "")
            self.seen.append((request["operation"], resource, request.get("name") or "",
                              user, code))
        response: dict[str, Any] = {"uid": request["uid"], "allowed": code == 200}
        if code != 200:
            response["status"] = {"code": code, "message": fault.message if fault else "",
                                  "reason": REASONS.get(code, "BadRequest")}
        return response, fault.delay if fault is not None else 0.0


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        response, delay = self.server.hook.review(body["request"])
        if delay:
            time.sleep(delay)  # the server gives up first: the delay is the fault itself
        data = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                           "response": response}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the API server stopped waiting

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hook: FaultWebhook


@contextmanager
def fault_webhook(client: kubernetes.client.ApiClient, namespace: str, user: str, *,
                  timeout_seconds: int = 2) -> Iterator[FaultWebhook]:
    """Serve the webhook on a loopback port with a certificate of its own CA, register
    it for ``namespace``, wait until the API server calls it; undo both on exit."""
    hook = FaultWebhook(namespace, user, timeout_seconds)
    ca = trustme.CA(organization_name="mailtls fault webhook")
    cert = ca.issue_cert("127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.hook = hook
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="fault-webhook", daemon=True)
    thread.start()
    admission: Any = kubernetes.client.AdmissionregistrationV1Api(client)
    name = f"mailtls-faults-{namespace}"
    admission.create_validating_webhook_configuration({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "faults.mailtls.test",
            "clientConfig": {"url": f"https://127.0.0.1:{server.server_address[1]}/review",
                             "caBundle": base64.b64encode(ca.cert_pem.bytes()).decode()},
            "rules": RULES,
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "failurePolicy": "Fail", "sideEffects": "None",
            "admissionReviewVersions": ["v1"], "timeoutSeconds": timeout_seconds}]})
    try:
        _wait_armed(client, hook, namespace)
        yield hook
    finally:
        try:
            admission.delete_validating_webhook_configuration(name)
        finally:
            server.shutdown()
            server.server_close()


def _wait_armed(client: kubernetes.client.ApiClient, hook: FaultWebhook, namespace: str,
                timeout: float = 15.0) -> None:
    """The API server loads webhook configurations from an informer: until it calls the
    webhook, a dry-run create (stored nowhere) goes unreviewed."""
    core: Any = kubernetes.client.CoreV1Api(client)
    deadline = time.monotonic() + timeout
    while not any(name.startswith(PROBE) for (_, _, name, _, _) in hook.seen):
        if time.monotonic() > deadline:
            raise AssertionError(f"the API server never called the webhook for {namespace}")
        core.create_namespaced_config_map(
            namespace, {"metadata": {"name": f"{PROBE}-{uuid.uuid4().hex[:8]}"}},
            dry_run="All")
        time.sleep(0.2)
