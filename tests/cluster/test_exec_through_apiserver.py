"""The operator's exec runner through the real kube-apiserver's ``pods/exec`` into a
local Postfix instance, via a kwok node (DESIGN.md §7, the exec trap).

The path: the official client's websocket -> kube-apiserver (which translates a
``v5.channel.k8s.io`` websocket to SPDY, or proxies a v4 one as it is) -> kwok's
kubelet endpoint on loopback -> ``postconf``/``postmap``/``cat`` run locally with the
pod's Postfix instance as ``MAIL_CONFIG``.  Only the container is simulated.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import statistics
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import websocket

from mailtls_operator.execrunner import (
    V4_CHANNEL_PROTOCOL,
    V4_NOTE,
    V5_CHANNEL_PROTOCOL,
    KubernetesExecRunner,
)
from mailtls_operator.execrunner import runner as runner_module
from mailtls_operator.podrunner import PodRef, PodRunnerError, StdinUnsupportedError
from testbed.controlplane import ControlPlane
from testbed.instance import LocalInstance, postfix_unavailable
from testbed.kwok import Kwok

pytestmark = pytest.mark.cluster

POLICY = "example.org secure\nexample.net encrypt\n"
_nodes = itertools.count()


@dataclass(frozen=True)
class PostfixPod:
    ref: PodRef
    instance: LocalInstance


@pytest.fixture
def postfix_pod(kwok: Kwok, namespace: str) -> Iterator[PostfixPod]:
    """A pod Running on a fresh kwok node whose container ``postfix`` execs into a
    local Postfix 3.7 configuration (created, not started: postconf and postmap need
    no master)."""
    if reason := postfix_unavailable():
        pytest.skip(reason)
    node = f"kwok-exec-{next(_nodes)}"
    kwok.add_node(node)
    base = Path(tempfile.mkdtemp(prefix="mailtls-kwok-"))
    base.chmod(0o755)  # Postfix's own users must reach in; pytest's tmp_path is 0700
    instance = LocalInstance(base / "pf").create(tls_policy=POLICY)
    kwok.run_pod(namespace, "mta-0", node)
    kwok.map_exec(namespace, "mta-0", work_dir=instance.root, env=instance.env,
                  containers=("postfix",))
    yield PostfixPod(PodRef(namespace, "mta-0"), instance)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def runner(controlplane: ControlPlane) -> Iterator[KubernetesExecRunner]:
    api = controlplane.api_client()
    yield KubernetesExecRunner(api)
    api.close()


async def _first_exec(runner: KubernetesExecRunner, pod: PodRef) -> None:
    """kwok learns of a new Exec object through its watch; until then an exec fails
    with "no exec found".  Poll with a deadline, so the measured execs start warm."""
    deadline = time.monotonic() + 15
    while True:
        try:
            await runner.run(pod, ["true"], timeout=10)
            return
        except PodRunnerError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def _ws_exec(plane: ControlPlane, pod: PodRef, argv: list[str], protocols: list[str],
             *, stdin: bytes | None = None, window: float = 10.0
             ) -> tuple[str, bytes, dict[str, object] | None]:
    """One exec with a bare websocket (no Kubernetes client): the negotiated
    subprotocol from the handshake's response header, stdout, and the error channel's
    Status, or None when none came within ``window`` seconds."""
    query = urllib.parse.urlencode(
        [("command", a) for a in argv] + [("container", pod.container),
                                           ("stdin", str(stdin is not None).lower()),
                                           ("stdout", "true"), ("stderr", "true")])
    url = (plane.url.replace("https://", "wss://")
           + f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}/exec?{query}")
    ws = websocket.create_connection(
        url, subprotocols=protocols, timeout=window,
        sslopt={"ca_certs": str(plane.ca_file), "certfile": str(plane.admin_cert),
                "keyfile": str(plane.admin_key)})
    negotiated = ws.getsubprotocol() or ""
    out, status = bytearray(), None
    deadline = time.monotonic() + window
    try:
        if stdin is not None:
            ws.send_binary(b"\x00" + stdin)
        while status is None and time.monotonic() < deadline:
            ws.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                opcode, data = ws.recv_data()
            except (websocket.WebSocketTimeoutException, TimeoutError):
                break
            except websocket.WebSocketConnectionClosedException:
                break
            if opcode == websocket.ABNF.OPCODE_CLOSE or not data:
                continue
            if data[0] == 1:
                out += data[1:]
            elif data[0] == 3 and data[1:]:
                status = json.loads(data[1:])
    finally:
        ws.close(timeout=0.5)
    return negotiated, bytes(out), status


async def test_postconf_reports_the_local_postfix_version_through_the_apiserver(
        runner: KubernetesExecRunner, postfix_pod: PostfixPod) -> None:
    await _first_exec(runner, postfix_pod.ref)
    result = await runner.run(postfix_pod.ref, ["postconf", "-h", "mail_version"], timeout=20)
    local = postfix_pod.instance.postconf("mail_version")["mail_version"]
    assert (result.returncode, result.stdout.decode().strip()) == (0, local)
    assert local.startswith("3.")
    # The runner notes a v4 exec; no note means the server took v5.
    assert result.notes == ()


async def test_stdin_reaches_eof_so_postmap_answers_every_key(
        runner: KubernetesExecRunner, postfix_pod: PostfixPod) -> None:
    await _first_exec(runner, postfix_pod.ref)
    table = postfix_pod.instance.tls_policy_map
    result = await runner.run(postfix_pod.ref, ["postmap", "-q", "-", table],
                              stdin=b"example.org\nexample.net\nmissing.test\n", timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == ["example.org\tsecure",
                                                   "example.net\tencrypt"]
    echoed = await runner.run(postfix_pod.ref, ["cat"], stdin=b"x" * 100_000, timeout=20)
    assert (echoed.returncode, len(echoed.stdout)) == (0, 100_000)


async def test_a_non_zero_exit_status_comes_back_as_the_commands_own(
        runner: KubernetesExecRunner, postfix_pod: PostfixPod) -> None:
    await _first_exec(runner, postfix_pod.ref)
    table = postfix_pod.instance.tls_policy_map
    missing = await runner.run(postfix_pod.ref, ["postmap", "-q", "missing.test", table],
                               timeout=20)
    assert missing.returncode == 1  # postmap -q: key not found
    failed = await runner.run(postfix_pod.ref, ["sh", "-c", "echo oops >&2; exit 7"],
                              timeout=20)
    assert (failed.returncode, failed.stderr) == (7, b"oops\n")


async def test_the_apiserver_negotiates_v5_when_offered_and_v4_when_only_v4_is(
        controlplane: ControlPlane, runner: KubernetesExecRunner,
        postfix_pod: PostfixPod) -> None:
    await _first_exec(runner, postfix_pod.ref)
    argv = ["postconf", "-h", "mail_version"]
    both = _ws_exec(controlplane, postfix_pod.ref, argv,
                    [V5_CHANNEL_PROTOCOL, V4_CHANNEL_PROTOCOL])
    only_v4 = _ws_exec(controlplane, postfix_pod.ref, argv, [V4_CHANNEL_PROTOCOL])
    assert both[0] == V5_CHANNEL_PROTOCOL
    assert only_v4[0] == V4_CHANNEL_PROTOCOL  # proxied to kwok's own websocket
    for _proto, out, status in (both, only_v4):
        assert out.startswith(b"3.")
        assert status is not None and status["status"] == "Success"


async def test_over_v4_stdin_never_closes_so_the_command_waits(
        controlplane: ControlPlane, runner: KubernetesExecRunner,
        postfix_pod: PostfixPod) -> None:
    """The trap itself, on the real path: over v4 ``cat`` echoes its input but, with no
    way to close stdin, never exits -- no status within the window."""
    await _first_exec(runner, postfix_pod.ref)
    proto, out, status = _ws_exec(controlplane, postfix_pod.ref, ["cat"],
                                  [V4_CHANNEL_PROTOCOL], stdin=b"hello\n", window=2.0)
    assert (proto, out, status) == (V4_CHANNEL_PROTOCOL, b"hello\n", None)


async def test_a_server_without_v5_makes_the_runner_refuse_stdin_rather_than_hang(
        runner: KubernetesExecRunner, postfix_pod: PostfixPod,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With v5 renamed to a protocol nobody knows, kube-apiserver does not translate
    and kwok -- the kubelet's streaming library, which speaks websocket only up to v4
    -- is what answers: a server without v5, for real.  With stdin the runner gets no
    v5 and fails fast, nothing sent; without stdin it runs over v4 and says so."""
    await _first_exec(runner, postfix_pod.ref)
    monkeypatch.setattr(runner_module, "V5_CHANNEL_PROTOCOL", "v5.unknown.k8s.io")
    began = time.monotonic()
    with pytest.raises(StdinUnsupportedError):
        await runner.run(postfix_pod.ref, ["cat"], stdin=b"hello\n", timeout=10)
    assert time.monotonic() - began < 5
    plain = await runner.run(postfix_pod.ref, ["postconf", "-h", "mail_version"], timeout=10)
    assert plain.returncode == 0 and plain.notes == (V4_NOTE,)


async def test_exec_latency_through_the_apiserver_is_measured(
        runner: KubernetesExecRunner, postfix_pod: PostfixPod) -> None:
    await _first_exec(runner, postfix_pod.ref)
    argv = ["postconf", "-h", "mail_version"]
    times = []
    for _ in range(10):
        began = time.perf_counter()
        result = await runner.run(postfix_pod.ref, argv, timeout=20)
        times.append(time.perf_counter() - began)
        assert result.returncode == 0
    median = statistics.median(times)
    print(f"\nexec through kube-apiserver via kwok: median {median * 1000:.1f} ms,"
          f" min {min(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms (n=10)")
    assert median < 2.0
