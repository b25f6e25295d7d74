"""KubernetesExecRunner against a loopback emulation of the exec endpoint.

The official ``kubernetes`` client is the code under test: every test goes
through its real websocket code over a real TCP (sometimes TLS) connection to
:class:`tests.unit.wsserver.FakeApiServer`.  Nothing is mocked.  Every wait is
bounded: runner timeouts are short and the server side is polled with limits.

It stays beside the real-server tier for the failure modes a real kube-apiserver
cannot be made to produce on demand (v4-only and subprotocol-less servers, hung
handshakes, silent upgrades; see the server's docstring); the ordinary exec path through
kube-apiserver and kwok is ``tests/cluster/test_exec_through_apiserver.py``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from kubernetes.client import ApiClient, Configuration

from mailtls_operator.execrunner import V4_NOTE, KubernetesExecRunner
from mailtls_operator.podrunner import PodRef, PodRunnerError, StdinUnsupportedError
from tests.unit.wsserver import V4, V5, FakeApiServer, pattern

POD = PodRef("mail", "postfix-0", "postfix")
MiB = 1024 * 1024
SHORT = 1.0  # timeout for the tests that must time out
MARGIN = 1.5  # what a timed-out run may take beyond its timeout

MakeServer = Callable[..., FakeApiServer]


@pytest.fixture
def make_server() -> Iterator[MakeServer]:
    servers: list[FakeApiServer] = []

    def make(**kwargs: Any) -> FakeApiServer:
        server = FakeApiServer(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def clients() -> Iterator[list[Any]]:
    made: list[Any] = []  # ApiClient, untyped
    yield made
    for api in made:
        api.close()


@pytest.fixture
def runner_for(clients: list[Any]) -> Callable[..., KubernetesExecRunner]:
    def make(server: FakeApiServer, *, ca: Path | None = None) -> KubernetesExecRunner:
        config = Configuration(host=server.url)
        config.api_key = {"BearerToken": "t0ken"}
        config.api_key_prefix = {"BearerToken": "Bearer"}
        if ca is not None:
            config.ssl_ca_cert = str(ca)
        api = ApiClient(config)
        clients.append(api)
        return KubernetesExecRunner(api)

    return make


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return context, ca_file


# --------------------------------------------------------------------------
# v5: stdin delivered and closed
# --------------------------------------------------------------------------


async def test_stdin_is_delivered_and_closed_on_v5(
    make_server: MakeServer, runner_for: Any
) -> None:
    server = make_server()
    result = await runner_for(server).run(
        POD, ["cat"], stdin=b"mx.example.org secure\n", timeout=10
    )
    assert result.returncode == 0
    assert result.stdout == b"mx.example.org secure\n"
    assert result.stderr == b""
    assert result.notes == ()
    [call] = server.calls
    assert call.protocol == V5
    assert call.stdin_closed_by_client  # the 0xff 0x00 close message arrived
    # With stdin only v5 is offered, so a v4 server can refuse before starting.
    assert call.headers["sec-websocket-protocol"] == V5


@pytest.mark.parametrize("size", [0, 1, 16 * 1024, 16 * 1024 + 1, MiB, MiB + 7])
async def test_cat_returns_exactly_the_input(
    make_server: MakeServer, runner_for: Any, size: int
) -> None:
    server = make_server()
    data = pattern(size)[::-1]
    result = await runner_for(server).run(POD, ["cat"], stdin=data, timeout=20)
    assert result.returncode == 0
    assert len(result.stdout) == size
    assert result.stdout == data
    assert server.calls[0].stdin_bytes == size
    assert server.calls[0].stdin_closed_by_client


async def test_stdin_without_echo_is_counted(make_server: MakeServer, runner_for: Any) -> None:
    server = make_server()
    result = await runner_for(server).run(POD, ["wc-c"], stdin=pattern(MiB), timeout=20)
    assert (result.returncode, result.stdout) == (0, f"{MiB}\n".encode())


async def test_command_exiting_while_stdin_is_sent_reports_its_status(
    make_server: MakeServer, runner_for: Any
) -> None:
    server = make_server()
    result = await runner_for(server).run(POD, ["head-fail"], stdin=pattern(4 * MiB), timeout=20)
    assert result.returncode == 3
    assert result.stderr == b"postmap: fatal: bad line\n"
    assert result.message() == "postmap: fatal: bad line"


# --------------------------------------------------------------------------
# Exit status, stdout, stderr
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["true"], 0),
        (["false"], 1),
        (["sh", "-c", "exit 2"], 2),
        (["sh", "-c", "exit 3"], 3),
        (["sh", "-c", "exit 255"], 255),
    ],
)
async def test_exit_code_comes_from_the_status_object(
    make_server: MakeServer, runner_for: Any, argv: list[str], code: int
) -> None:
    server = make_server()
    result = await runner_for(server).run(POD, argv, timeout=10)
    assert result.returncode == code
    assert result.ok is (code == 0)


async def test_stderr_and_stdout_are_captured_separately(
    make_server: MakeServer, runner_for: Any
) -> None:
    server = make_server()
    msg = "postmap: fatal: open /etc/postfix/tls_policy.new: No such file or directory"
    result = await runner_for(server).run(POD, ["fail-stderr", "2", msg], timeout=10)
    assert result.returncode == 2
    assert result.stdout == b"partial output\n"
    assert result.stderr == msg.encode() + b"\n"
    assert result.message() == msg


@pytest.mark.parametrize("close_frames", [False, True])
async def test_large_stdout(make_server: MakeServer, runner_for: Any, close_frames: bool) -> None:
    # close_frames: the server also sends v5 "0xff 1"/"0xff 2" before the status.
    server = make_server(close_output_channels=close_frames)
    result = await runner_for(server).run(POD, ["bigout", str(MiB)], timeout=20)
    assert result.returncode == 0
    assert result.stdout == pattern(MiB)
    assert result.stderr == b"starting\ndone\n"


async def test_command_not_found_is_a_runner_error(
    make_server: MakeServer, runner_for: Any
) -> None:
    server = make_server()
    with pytest.raises(PodRunnerError, match="executable file not found") as info:
        await runner_for(server).run(POD, ["postmapx", "-q", "x"], timeout=10)
    assert not isinstance(info.value, StdinUnsupportedError)


# --------------------------------------------------------------------------
# v4 and other servers that cannot close stdin
# --------------------------------------------------------------------------


async def test_v4_only_server_with_stdin_refuses_quickly_and_starts_nothing(
    make_server: MakeServer, runner_for: Any
) -> None:
    server = make_server(protocols=(V4,))
    start = time.monotonic()
    with pytest.raises(StdinUnsupportedError, match=r"v5\.channel\.k8s\.io"):
        await runner_for(server).run(POD, ["cat"], stdin=b"data\n", timeout=30)
    assert time.monotonic() - start < 1.0
    [call] = server.calls
    assert not call.started
    assert call.stdin_bytes == 0


async def test_v4_only_server_without_stdin_works_and_says_so(
    make_server: MakeServer, runner_for: Any
) -> None:
    server = make_server(protocols=(V4,))
    result = await runner_for(server).run(POD, ["fail-stderr", "1", "oops"], timeout=10)
    assert (result.returncode, result.stdout, result.stderr) == (1, b"partial output\n", b"oops\n")
    assert result.notes == (V4_NOTE,)
    [call] = server.calls
    assert call.protocol == V4
    assert call.headers["sec-websocket-protocol"] == f"{V5},{V4}"
    assert call.values("stdin") == ["false"]


async def test_v5_server_without_stdin_has_no_notes(
    make_server: MakeServer, runner_for: Any
) -> None:
    server = make_server()
    result = await runner_for(server).run(POD, ["true"], timeout=10)
    assert result.notes == ()
    assert server.calls[0].protocol == V5


async def test_server_without_subprotocol_and_stdin_sends_no_stdin(
    make_server: MakeServer, runner_for: Any
) -> None:
    server = make_server(mode="no-subprotocol")
    start = time.monotonic()
    with pytest.raises(StdinUnsupportedError, match="no stdin was sent"):
        await runner_for(server).run(POD, ["cat"], stdin=b"data\n", timeout=30)
    assert time.monotonic() - start < 1.0
    assert server.calls[0].stdin_bytes == 0


async def test_rbac_refusal_is_not_mistaken_for_missing_v5(
    make_server: MakeServer, runner_for: Any
) -> None:
    server = make_server(mode="forbidden")
    with pytest.raises(PodRunnerError, match=r"HTTP 403 .*cannot create resource") as info:
        await runner_for(server).run(POD, ["cat"], stdin=b"x", timeout=10)
    assert not isinstance(info.value, StdinUnsupportedError)


# --------------------------------------------------------------------------
# Servers that never answer: bounded, and the socket is closed
# --------------------------------------------------------------------------


async def _times_out(runner: KubernetesExecRunner, argv: list[str], **kw: Any) -> float:
    start = time.monotonic()
    with pytest.raises(PodRunnerError) as info:
        await runner.run(POD, argv, timeout=SHORT, **kw)
    elapsed = time.monotonic() - start
    assert not isinstance(info.value, StdinUnsupportedError)
    assert SHORT - 0.05 <= elapsed < SHORT + MARGIN, elapsed
    return elapsed


@pytest.mark.parametrize("stdin", [None, b"data\n"])
async def test_silent_server_times_out_and_disconnects(
    make_server: MakeServer, runner_for: Any, stdin: bytes | None
) -> None:
    server = make_server(mode="silent")
    await _times_out(runner_for(server), ["cat"], stdin=stdin)
    gone = await asyncio.to_thread(server.wait_disconnect, server.calls[0], 3.0)
    assert gone is not None and gone < SHORT + MARGIN


async def test_command_that_never_ends_times_out_and_disconnects(
    make_server: MakeServer, runner_for: Any
) -> None:
    server = make_server()
    await _times_out(runner_for(server), ["sleep-forever"])
    gone = await asyncio.to_thread(server.wait_disconnect, server.calls[0], 3.0)
    assert gone is not None and gone < SHORT + MARGIN


async def test_unanswered_handshake_times_out_and_socket_is_closed(
    make_server: MakeServer, runner_for: Any
) -> None:
    # The client connects with timeout=None: without the runner's abort the
    # worker thread (and the socket) would stay blocked for ever.
    server = make_server(mode="hang-handshake")
    await _times_out(runner_for(server), ["true"])
    gone = await asyncio.to_thread(server.wait_disconnect, server.calls[0], 3.0)
    assert gone is not None and gone < SHORT + MARGIN


async def test_unanswered_handshake_over_tls_times_out_and_socket_is_closed(
    make_server: MakeServer, runner_for: Any, tls: tuple[ssl.SSLContext, Path]
) -> None:
    context, ca = tls
    server = make_server(mode="hang-handshake", ssl_context=context)
    await _times_out(runner_for(server, ca=ca), ["true"])
    gone = await asyncio.to_thread(server.wait_disconnect, server.calls[0], 3.0)
    assert gone is not None and gone < SHORT + MARGIN


async def test_cancelling_run_disconnects(make_server: MakeServer, runner_for: Any) -> None:
    server = make_server(mode="hang-handshake")
    task = asyncio.ensure_future(runner_for(server).run(POD, ["true"], timeout=30))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    gone = await asyncio.to_thread(server.wait_disconnect, server.calls[0], 3.0)
    assert gone is not None


async def test_cancelled_run_leaves_no_task_that_fails(
        make_server: MakeServer, runner_for: Any) -> None:
    """Kopf, stopping on SIGTERM, waits for every task left over and re-raises their
    errors: an exec cancelled mid-way must not leave its worker to fail there (the
    operator then exited 1 on SIGTERM, seen with the images in tests/images)."""
    server = make_server(mode="silent")
    before = asyncio.all_tasks()
    task = asyncio.ensure_future(runner_for(server).run(POD, ["true"], timeout=30))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    left = asyncio.all_tasks() - before - {task}
    done, pending = await asyncio.wait(left, timeout=3) if left else (set(), set())
    assert not pending
    assert [t for t in done if not t.cancelled() and t.exception() is not None] == []


async def test_connection_refused_is_a_runner_error(runner_for: Any) -> None:
    server = FakeApiServer().start()
    server.stop()  # port now closed
    start = time.monotonic()
    with pytest.raises(PodRunnerError, match="connection failed"):
        await runner_for(server).run(POD, ["true"], timeout=10)
    assert time.monotonic() - start < 2


# --------------------------------------------------------------------------
# What goes on the wire
# --------------------------------------------------------------------------

NASTY_ARGV = [
    "argv-json",
    "two words",
    'it\'s "quoted"',
    "line1\nline2\r\n",
    "",
    "; rm -rf / #",
    "$(id) `id` ${HOME}",
    "a&command=injected&b=c",
    "100% + 50%20",
    "/etc/postfix/tls_policy?x#y",
    "tab\there \\ back",
    "bücher.example ☃",
]


async def test_argv_arrives_verbatim_as_separate_command_params(
    make_server: MakeServer, runner_for: Any
) -> None:
    server = make_server()
    result = await runner_for(server).run(POD, NASTY_ARGV, timeout=10)
    assert json.loads(result.stdout) == NASTY_ARGV
    [call] = server.calls
    assert call.command == NASTY_ARGV
    assert call.raw_query.count("command=") == len(NASTY_ARGV)
    assert ("command", "injected") not in call.query
    assert call.values("b") == []


async def test_request_encoding(make_server: MakeServer, runner_for: Any) -> None:
    server = make_server()
    runner = runner_for(server)
    pod = PodRef("mail ns", "postfix-0", "postfix-sidecar")
    await runner.run(pod, ["cat"], stdin=b"", timeout=10)
    await runner.run(
        pod, ["postmap", "-q", "example.org", "lmdb:/etc/postfix/tls_policy"], timeout=10
    )
    with_stdin, without = server.calls
    assert (with_stdin.namespace, with_stdin.pod) == ("mail ns", "postfix-0")
    assert with_stdin.raw_query == (
        "command=cat&container=postfix-sidecar&stdin=true&stdout=true&stderr=true&tty=false"
    )
    assert without.raw_query == (
        "command=postmap&command=-q&command=example.org"
        "&command=lmdb%3A/etc/postfix/tls_policy"
        "&container=postfix-sidecar&stdin=false&stdout=true&stderr=true&tty=false"
    )
    for call in server.calls:
        assert call.headers["authorization"] == "Bearer t0ken"
        assert call.headers["upgrade"].lower() == "websocket"


async def test_tls_exec(
    make_server: MakeServer, runner_for: Any, tls: tuple[ssl.SSLContext, Path]
) -> None:
    context, ca = tls
    server = make_server(ssl_context=context)
    result = await runner_for(server, ca=ca).run(POD, ["cat"], stdin=pattern(MiB), timeout=20)
    assert result.stdout == pattern(MiB)


async def test_concurrent_execs_share_one_api_client(
    make_server: MakeServer, clients: list[Any], runner_for: Any
) -> None:
    server = make_server()
    runner = runner_for(server)
    api = clients[-1]
    call_api = api.call_api
    inputs = [f"pod {i}\n".encode() * (1000 * i + 1) for i in range(8)]
    results = await asyncio.gather(
        *(runner.run(POD, ["cat"], stdin=data, timeout=20) for data in inputs)
    )
    assert [r.stdout for r in results] == inputs
    assert api.call_api == call_api  # the runner never swaps the client's transport
