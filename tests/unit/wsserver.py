"""A loopback emulation of the API server's ``pods/{pod}/exec`` websocket endpoint.

It exists so the official ``kubernetes`` client can be tested for real: the
exec runner talks to it over TCP (optionally TLS), through the client's own
websocket code, with no mocks.  It reproduces what matters about the real
endpoint:

* subprotocol negotiation as ``x/net/websocket`` does it for the API
  server/kubelet: the first protocol *the client* offers that the server
  supports wins; if none matches, ``403`` with an empty body, before any
  command starts;
* channel framing: first byte is the channel (0 stdin, 1 stdout, 2 stderr,
  3 error/``Status``, 4 resize); in ``v5.channel.k8s.io`` the message
  ``0xff <channel>`` closes a channel; in v4 stdin only ends when the
  connection does (the trap the runner must avoid);
* the exit status as a ``metav1.Status`` on channel 3, then a websocket close.

Commands (``command=`` query parameters, argv form) come from a small table,
see :meth:`FakeApiServer._command`.  ``mode`` selects misbehaviour:
``"normal"``, ``"hang-handshake"`` (request read, no HTTP answer ever),
``"silent"`` (upgrade done, then nothing), ``"forbidden"`` (RBAC-style 403
with a Status body), ``"no-subprotocol"`` (101 without a
``Sec-WebSocket-Protocol`` header).

Why it stays now that the API emulation is retired: it is not that emulation (it never
imported ``testbed/apiserver.py``), and a real kube-apiserver cannot be made to misbehave
in these ways on demand -- a v4-only or subprotocol-less server, a handshake never
answered, silence after the upgrade.  The ordinary path, through kube-apiserver and a
kwok "kubelet" into a real Postfix, is proven in
``tests/cluster/test_exec_through_apiserver.py``.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
BOTH = (V5, V4)

STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
_FRAME = 64 * 1024


def pattern(n: int) -> bytes:
    """``n`` deterministic bytes covering all byte values (0x00 and 0xff included)."""
    block = bytes(range(256)) * 256
    return (block * (n // len(block) + 1))[:n]


@dataclass
class ExecCall:
    """What one exec request looked like on the wire, and what happened to it."""

    namespace: str
    pod: str
    raw_query: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    protocol: str | None = None
    started: bool = False
    stdin_bytes: int = 0
    stdin_closed_by_client: bool = False
    disconnected_at: float | None = None
    opened_at: float = field(default_factory=time.monotonic)

    def values(self, key: str) -> list[str]:
        return [v for k, v in self.query if k == key]

    @property
    def command(self) -> list[str]:
        return self.values("command")


class _Session:
    """One running fake command: stdin queue in, framed output out."""

    def __init__(self, ws: web.WebSocketResponse, call: ExecCall) -> None:
        self.ws = ws
        self.call = call
        self.v5 = call.protocol == V5
        self.stdin: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def pump_stdin(self) -> None:
        async for msg in self.ws:
            if msg.type == WSMsgType.BINARY:
                data: bytes = msg.data
            elif msg.type == WSMsgType.TEXT:
                data = msg.data.encode()
            else:
                break
            if not data:
                continue
            channel = data[0]
            if self.v5 and channel == CLOSE:
                if data[1:2] == bytes([STDIN]):
                    self.call.stdin_closed_by_client = True
                    self.stdin.put_nowait(None)
            elif channel == STDIN:
                self.call.stdin_bytes += len(data) - 1
                self.stdin.put_nowait(data[1:])
        # The kubelet closes the command's stdin when the connection goes.
        self.call.disconnected_at = time.monotonic()
        self.stdin.put_nowait(None)

    async def read_stdin(self) -> bytes | None:
        return await self.stdin.get()

    async def write(self, channel: int, data: bytes) -> None:
        for i in range(0, len(data), _FRAME):
            await self.ws.send_bytes(bytes([channel]) + data[i : i + _FRAME])


Command = Callable[[_Session, list[str]], Coroutine[Any, Any, int | dict[str, Any]]]


class FakeApiServer:
    """The exec endpoint on 127.0.0.1, served by aiohttp in a background thread."""

    def __init__(
        self,
        *,
        protocols: tuple[str, ...] = BOTH,
        mode: str = "normal",
        ssl_context: ssl.SSLContext | None = None,
        close_output_channels: bool = False,
    ) -> None:
        self.protocols = protocols
        self.mode = mode
        self.close_output_channels = close_output_channels
        self.calls: list[ExecCall] = []
        self._ssl = ssl_context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl else 'http'}://127.0.0.1:{self.port}"

    # ---- lifecycle ---------------------------------------------------

    def start(self) -> FakeApiServer:
        self._thread = threading.Thread(target=self._serve, name="fake-apiserver", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake API server did not start")
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        future.result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.run_until_complete(self._setup())
        self._ready.set()
        loop.run_forever()
        loop.close()

    async def _setup(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{namespace}/pods/{pod}/exec", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def _shutdown(self) -> None:
        assert self._stop is not None and self._runner is not None
        self._stop.set()
        for task in list(self._tasks):
            task.cancel()
        await self._runner.cleanup()

    def wait_disconnect(self, call: ExecCall, timeout: float) -> float | None:
        """Seconds from the request to the client's disconnect, polling up to ``timeout``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if call.disconnected_at is not None:
                return call.disconnected_at - call.opened_at
            time.sleep(0.01)
        return None

    # ---- the endpoint ------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None and self._stop is not None
        self._tasks.add(task)
        try:
            return await self._exec(request)
        finally:
            self._tasks.discard(task)

    async def _exec(self, request: web.Request) -> web.StreamResponse:
        assert self._stop is not None
        call = ExecCall(
            namespace=request.match_info["namespace"],
            pod=request.match_info["pod"],
            raw_query=request.rel_url.raw_query_string,
            query=list(request.rel_url.query.items()),
            headers={k.lower(): v for k, v in request.headers.items()},
        )
        self.calls.append(call)

        if self.mode == "forbidden":
            status = {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f'pods "{call.pod}" is forbidden: User "system:serviceaccount:'
                f'mailtls:op" cannot create resource "pods/exec"',
                "reason": "Forbidden",
                "code": 403,
            }
            return web.json_response(status, status=403)
        if self.mode == "hang-handshake":
            await self._until_disconnect(request, call)
            return web.Response(status=500)

        offered = [
            p.strip()
            for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        ]
        chosen = next((p for p in offered if p in self.protocols), None)
        if self.mode == "no-subprotocol":
            chosen = None
        elif offered and chosen is None:
            # x/net/websocket: "requested protocol(s) are not supported" -> bare 403.
            return web.Response(status=403)
        call.protocol = chosen

        ws = web.WebSocketResponse(protocols=(chosen,) if chosen else (), autoping=True)
        await ws.prepare(request)
        session = _Session(ws, call)
        reader = asyncio.ensure_future(session.pump_stdin())
        try:
            if self.mode == "silent":
                await asyncio.wait(
                    {reader, asyncio.ensure_future(self._stop.wait())},
                    return_when=asyncio.FIRST_COMPLETED,
                )
                return ws
            call.started = True
            try:
                outcome = await self._command(session, call.command)
                if self.close_output_channels and session.v5:
                    await ws.send_bytes(bytes([CLOSE, STDOUT]))
                    await ws.send_bytes(bytes([CLOSE, STDERR]))
                await ws.send_bytes(bytes([ERROR]) + json.dumps(_status(outcome, call)).encode())
                await ws.close()
            except ConnectionError:
                pass  # the client went away first (expected in some tests)
            return ws
        finally:
            reader.cancel()

    async def _until_disconnect(self, request: web.Request, call: ExecCall) -> None:
        assert self._stop is not None
        while not self._stop.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                call.disconnected_at = time.monotonic()
                return
            await asyncio.sleep(0.01)

    async def _command(self, s: _Session, argv: list[str]) -> int | dict[str, Any]:
        """The fake container's commands."""
        assert self._stop is not None
        name, args = (argv[0], argv[1:]) if argv else ("", [])
        if name == "cat":  # echo stdin until it is closed
            while (chunk := await s.read_stdin()) is not None:
                await s.write(STDOUT, chunk)
            return 0
        if name == "wc-c":  # count stdin bytes until it is closed
            total = 0
            while (chunk := await s.read_stdin()) is not None:
                total += len(chunk)
            await s.write(STDOUT, f"{total}\n".encode())
            return 0
        if name == "true":
            return 0
        if name == "false":
            return 1
        if name == "sh" and len(args) == 2 and args[0] == "-c":
            m = re.fullmatch(r"exit (\d+)", args[1])
            if m:
                return int(m.group(1))
        if name == "argv-json":  # prints its argv, so tests see what arrived
            await s.write(STDOUT, json.dumps(argv).encode())
            return 0
        if name == "fail-stderr":  # fail-stderr CODE MESSAGE
            await s.write(STDOUT, b"partial output\n")
            await s.write(STDERR, args[1].encode() + b"\n")
            return int(args[0])
        if name == "bigout":  # bigout N: N bytes on stdout, some on stderr
            n = int(args[0])
            await s.write(STDERR, b"starting\n")
            await s.write(STDOUT, pattern(n))
            await s.write(STDERR, b"done\n")
            return 0
        if name == "head-fail":  # reads one chunk of stdin, exits 3 without the rest
            await s.read_stdin()
            await s.write(STDERR, b"postmap: fatal: bad line\n")
            return 3
        if name == "postmap" and args[:1] == ["-q"]:  # postmap -q KEY MAP
            await s.write(STDOUT, b"secure match=.example.org\n")
            return 0
        if name == "sleep-forever":
            await self._stop.wait()
            return 0
        return {
            "metadata": {},
            "status": "Failure",
            "message": "Internal error occurred: error executing command in container: failed"
            f' to exec in container: exec: "{name}": executable file not found in $PATH',
            "reason": "InternalError",
            "details": {"causes": [{"message": f'exec: "{name}": executable file not found'}]},
            "code": 500,
        }


def _status(outcome: int | dict[str, Any], call: ExecCall) -> dict[str, Any]:
    """The ``metav1.Status`` the API server puts on the error channel."""
    if isinstance(outcome, dict):
        return outcome
    if outcome == 0:
        return {"metadata": {}, "status": "Success"}
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: error executing command "
        f"{call.command}, exit code {outcome}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(outcome)}]},
    }
