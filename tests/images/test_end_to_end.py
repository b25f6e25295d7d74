"""``make demo``'s scenario with containers and the real control plane.

The operator runs in its image (``mailtls run``, the chart's args, securityContext,
ServiceAccount token and RBAC) against the real kube-apiserver; the Postfix pod is the
example Postfix image run as the example Deployment runs it, and its API object is a pod
on a kwok node whose ``pods/exec`` lands in that container (:mod:`tests.images.kwokexec`).
So a policy change travels: API -> operator container -> its websocket exec client ->
kube-apiserver (RBAC: the chart's exec grant) -> kwok's kubelet endpoint -> ``podman
exec`` -> postmap/mv in the Postfix container, and real mail from that container to a
plain SMTP sink on the host is deferred under ``encrypt`` and delivered once the policy
is relaxed to ``may``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from mailtls_operator.render import REVISION_KEY
from testbed import SmtpSink, plain_sink
from testbed.kwok import Kwok
from tests.cluster.operating.audit import AuditLog
from tests.cluster.operating.helpers import GROUP, PLURAL, VERSION, policy, until
from tests.cluster.rbac_setup import Install
from tests.images.harness import PostfixPod
from tests.images.kwokexec import CONTAINER_ENV
from tests.images.operator import OperatorContainer
from tests.images.pods import CONTAINERS_CONF

pytestmark = pytest.mark.images
_nodes = itertools.count()


class Stack:
    """The sink, the Postfix pod (container + API object) and the operator container."""

    def __init__(self, install: Install, kwok: Kwok, client: kubernetes.client.ApiClient,
                 base: Path) -> None:
        self.install, self.kwok, self.ns = install, kwok, install.watched
        self.custom: Any = kubernetes.client.CustomObjectsApi(client)
        self.core: Any = kubernetes.client.CoreV1Api(client)
        self.sink: SmtpSink = plain_sink().start()
        self.pod = PostfixPod(base / "postfix",
                              routes={"plain.example.test": f"smtp:{self.sink.nexthop}"})
        self.operator = OperatorContainer(base / "operator", install)
        self.exec_dir = base / "exec"

    def start(self) -> None:
        self.pod.lay_out()  # the ConfigMap does not exist yet: empty tables
        assert "loaded tls_policy from (none: empty table)" in self.pod.load_tables()
        container = self.pod.start()
        node = f"images-{next(_nodes)}"
        self.kwok.add_node(node)
        self.kwok.run_pod(self.ns, "relay-0", node, container=self.container_name,
                          labels=self.pod.labels, annotations=self.pod.annotations)
        self.exec_dir.mkdir(parents=True, exist_ok=True)
        self.kwok.map_exec(self.ns, "relay-0", work_dir=self.exec_dir,
                           env={CONTAINER_ENV: container.name,
                                "CONTAINERS_CONF": str(CONTAINERS_CONF)},
                           containers=(self.container_name,))
        self.operator.start(debounce="0.1", max_delay="1")

    @property
    def container_name(self) -> str:
        return self.pod.annotations["mailtls.io/container"]

    def stop(self) -> None:
        self.operator.remove()
        self.pod.stop()
        self.sink.stop()

    def apply(self, name: str, **spec: Any) -> None:
        obj = policy(name, self.ns, **spec)
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, obj)
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise
            self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, self.ns, PLURAL, name,
                [{"op": "replace", "path": "/spec", "value": obj["spec"]}],
                _content_type="application/json-patch+json")

    def policy(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.ns, PLURAL, name)
        return found

    def diagnosis(self) -> str:
        """What to read when the scenario stalls: both containers' logs, kwok's."""
        logs = [c.logs()[-3000:] for c in (self.operator.container, self.pod.container) if c]
        return "\n\n".join([*logs, self.kwok.log.read_text(errors="replace")[-2000:]])

    def rolled_out(self, name: str, level: str) -> dict[str, Any]:
        """Ready/RolledOut for the policy's current spec, with the table live in the pod."""
        def check() -> dict[str, Any] | None:
            obj = self.policy(name)
            status = obj.get("status") or {}
            if status.get("observedGeneration") != obj["metadata"].get("generation"):
                return None
            cond: dict[str, Any] = next(
                (c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
            return cond if cond.get("reason") == "RolledOut" else None
        try:
            ready: dict[str, Any] = until(check, 90, what=f"{name} rolled out")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnosis()}") from None
        assert self.pod.query(self.sink.nexthop) == level
        return ready


@pytest.fixture
def stack(install: Install, kwok_podman: Kwok, admin_client: kubernetes.client.ApiClient,
          tmp_path: Path) -> Iterator[Stack]:
    s = Stack(install, kwok_podman, admin_client, tmp_path)
    try:
        s.start()
        yield s
    finally:
        s.stop()


def _logged(stack: Stack, text: str, timeout: float = 30) -> None:
    container = stack.pod.container
    assert container is not None
    until(lambda: text in container.logs(), timeout, what=f"{text!r} in the Postfix log")


def test_policy_reaches_the_postfix_container_through_exec_and_governs_real_mail(
        stack: Stack, audit: AuditLog) -> None:
    stack.apply("plain-partner", destinations=[stack.sink.nexthop], level="encrypt")
    ready = stack.rolled_out("plain-partner", "encrypt")
    assert "relay: 1/1 pods verified" in str(ready["message"])
    revision = stack.policy("plain-partner")["status"]["instances"][0]["revision"]
    assert stack.pod.query(REVISION_KEY) == f"secure match=rev-{revision[:16]}"
    pod = stack.core.read_namespaced_pod("relay-0", stack.ns)
    assert pod.metadata.annotations["mailtls.io/applied-revision"] == revision
    # The operator's own commands, through the server's pods/exec as its ServiceAccount:
    # the table went in over stdin (v5 close), was compiled and swapped in.
    audit.barrier()
    execs = audit.select(("create", "get"), "pods", subresource="exec",
                         user=stack.install.user, where=lambda r: r.name == "relay-0")
    ran = {(r.query.get("command") or [""])[0] for r in execs}
    assert {"sh", "postmap", "mv"} <= ran, [(r.query.get("command"), r.code) for r in execs]

    stack.pod.send("alice@plain.example.test")
    _logged(stack, "TLS is required, but was not offered")
    assert stack.sink.messages == []

    stack.apply("plain-partner", destinations=[stack.sink.nexthop], level="may")
    stack.rolled_out("plain-partner", "may")
    # The operator releases the deferred mail itself (postqueue -i in the pod).
    try:
        stack.sink.wait_for(1, 60)
    except TimeoutError:
        raise AssertionError(stack.diagnosis()) from None
    assert [m.rcpt_tos for m in stack.sink.messages] == [("alice@plain.example.test",)]
    assert not stack.sink.messages[0].tls

    assert stack.operator.container is not None
    code = stack.operator.container.stop(20)
    assert code == 0, stack.operator.container.logs()[-4000:]
