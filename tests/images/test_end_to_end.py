"""``make demo``'s scenario with containers instead of local processes.

The operator runs in its image (``mailtls run``, the chart's securityContext), the
Postfix "pod" ``mail/relay-0`` is the example Postfix image run as the example
Deployment runs it, and the API emulation on the host serves ``pods/exec`` by running
``podman exec`` in that container (:mod:`tests.images.podexec`). So a policy change
travels: API -> operator container -> its websocket exec client -> the emulation's exec
endpoint -> ``podman exec`` -> postmap/mv/postfix reload in the Postfix container, and
real mail from that container to a plain SMTP sink on the host is deferred under
``encrypt`` and delivered once the policy is relaxed to ``may``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import kubernetes.client
import pytest

from mailtls_operator.render import REVISION_KEY
from testbed import SmtpSink, plain_sink
from tests.images.harness import PostfixPod
from tests.images.operator import OperatorContainer
from tests.images.podexec import ExecApiServer
from tests.images.test_postfix_image import poll_logs

pytestmark = pytest.mark.images
GROUP, VERSION, PLURAL = "mailtls.io", "v1alpha1", "mailtlspolicies"


class Stack:
    """The sink, the Postfix pod and the operator container of one test."""

    def __init__(self, server: ExecApiServer, client: kubernetes.client.ApiClient,
                 base: Path) -> None:
        self.server = server
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.sink: SmtpSink = plain_sink().start()
        self.pod = PostfixPod(base / "postfix",
                              routes={"plain.example.test": f"smtp:{self.sink.nexthop}"})
        self.operator = OperatorContainer(base / "operator", str(server.url).rstrip("/"))

    async def start(self) -> None:
        self.pod.lay_out()  # the ConfigMap does not exist yet: empty tables
        loaded = await asyncio.to_thread(self.pod.load_tables)
        assert "loaded tls_policy from (none: empty table)" in loaded
        container = await asyncio.to_thread(self.pod.start)
        self.server.seed("v1/pods", self.pod.pod_object("relay-0"))
        self.server.bind("mail", "relay-0", self.pod.annotations["mailtls.io/container"],
                         container.name)
        await asyncio.to_thread(self.operator.start, debounce="0.1", max_delay="1")
        await self.server.wait_until(lambda: self.server.watch_count(PLURAL) > 0, 30)

    def stop(self) -> None:
        self.operator.remove()
        self.pod.stop()
        self.sink.stop()

    async def apply(self, name: str, **spec: object) -> None:
        obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MailTLSPolicy",
               "metadata": {"name": name, "namespace": "mail"},
               "spec": {"instances": ["relay"], **spec}}
        if self.server.get_object(PLURAL, "mail", name) is None:
            await asyncio.to_thread(self.custom.create_namespaced_custom_object, GROUP,
                                    VERSION, "mail", PLURAL, obj)
        else:
            await asyncio.to_thread(
                self.custom.patch_namespaced_custom_object, GROUP, VERSION, "mail", PLURAL,
                name, [{"op": "replace", "path": "/spec", "value": obj["spec"]}],
                _content_type="application/json-patch+json")

    def diagnosis(self) -> str:
        """What to read when the scenario stalls: the exec calls, both containers' logs."""
        calls = "\n".join(f"  {code} {argv}" for (_, _, argv, code) in self.server.exec_log)
        logs = [c.logs()[-3000:] for c in (self.operator.container, self.pod.container) if c]
        return f"exec calls:\n{calls}\n\n" + "\n\n".join(logs)

    def status(self, name: str) -> dict[str, object]:
        obj = self.server.get_object(PLURAL, "mail", name) or {}
        return obj.get("status") or {}

    async def rolled_out(self, name: str, level: str) -> dict[str, object]:
        """Ready/RolledOut for the policy's current spec, with the table live in the pod."""
        def check() -> dict[str, object] | None:
            obj = self.server.get_object(PLURAL, "mail", name) or {}
            status = obj.get("status") or {}
            if status.get("observedGeneration") != obj["metadata"].get("generation"):
                return None
            cond: dict[str, object] = next(
                (c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
            return cond if cond.get("reason") == "RolledOut" else None
        ready = await self.server.wait_until(check, 60)
        assert ready is not None
        assert await asyncio.to_thread(self.pod.query, self.sink.nexthop) == level
        return ready


@pytest.fixture
async def stack(apiserver: ExecApiServer, kube_client: kubernetes.client.ApiClient,
                tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(apiserver, kube_client, tmp_path)
    try:
        await s.start()
        yield s
    finally:
        await asyncio.to_thread(s.stop)


async def test_policy_reaches_the_postfix_container_through_exec_and_governs_real_mail(
        stack: Stack, apiserver: ExecApiServer) -> None:
    await stack.apply("plain-partner", destinations=[stack.sink.nexthop], level="encrypt")
    ready = await stack.rolled_out("plain-partner", "encrypt")
    assert "relay: 1/1 pods verified" in str(ready["message"])
    revision = stack.status("plain-partner")["instances"][0]["revision"]  # type: ignore[index]
    assert await asyncio.to_thread(stack.pod.query, REVISION_KEY) == \
        f"secure match=rev-{revision[:16]}"
    pod = apiserver.get_object("v1/pods", "mail", "relay-0") or {}
    assert pod["metadata"]["annotations"]["mailtls.io/applied-revision"] == revision
    # The operator's own commands, run in the container by podman exec: the table went
    # in over stdin (v5 close), was compiled and swapped in.
    ran = [argv[0] for (_, pod_name, argv, code) in apiserver.exec_log
           if pod_name == "relay-0" and code == 0]
    assert {"sh", "postmap", "mv"} <= set(ran)

    await asyncio.to_thread(stack.pod.send, "alice@plain.example.test")
    await poll_logs(stack.pod, "TLS is required, but was not offered")
    assert stack.sink.messages == []

    await stack.apply("plain-partner", destinations=[stack.sink.nexthop], level="may")
    await stack.rolled_out("plain-partner", "may")
    # The operator releases the deferred mail itself (postqueue -i in the pod).
    try:
        await asyncio.to_thread(stack.sink.wait_for, 1, 60)
    except TimeoutError:
        raise AssertionError(stack.diagnosis()) from None
    assert [m.rcpt_tos for m in stack.sink.messages] == [("alice@plain.example.test",)]
    assert not stack.sink.messages[0].tls

    assert stack.operator.container is not None
    code = await asyncio.to_thread(stack.operator.container.stop, 20)
    assert code == 0, stack.operator.container.logs()[-4000:]
