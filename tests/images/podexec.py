"""``pods/exec`` for pods that are real containers: the API emulation's exec endpoint,
bridged to ``podman exec``. Test harness only; the package knows nothing of podman.

A real API server forwards an exec websocket to the kubelet, which runs the command in
the container through the runtime. Here :class:`ExecApiServer` (the emulation, plus
this endpoint) runs ``podman exec [--interactive] CONTAINER ARGV...`` instead and
speaks the same wire protocol the operator's :mod:`mailtls_operator.execrunner` is
written against (see ``tests/unit/wsserver.py`` for the loopback twin used in unit
tests):

* subprotocol negotiation as ``x/net/websocket`` does it: the first protocol the
  client offers that the server supports (v5, then v4) wins; none: a bare 403 before
  anything runs;
* channel framing: byte 0 is the channel (0 stdin, 1 stdout, 2 stderr, 3 error); in
  ``v5.channel.k8s.io`` the message ``0xff 0x00`` closes stdin, in v4 stdin ends only
  with the connection;
* the outcome as a ``metav1.Status`` on channel 3: ``Success``, ``NonZeroExitCode``
  with the code in an ``ExitCode`` cause, or ``InternalError`` when the command could
  not be started (podman's exit codes 125-127 with its own message), then a close.

Pods are mapped to containers with :meth:`ExecApiServer.bind`; an exec for a pod or
container that is not bound answers 404 like a real server for a missing pod.

Where it differs from a real API server + kubelet: no authentication or RBAC check
(no 403 Forbidden for a missing ``pods/exec`` grant), no ``tty`` and no resize
channel (4), no ``v4``-era ``base64.channel.k8s.io`` protocols, and the command runs
with ``podman exec``'s defaults (the container's user, environment and working
directory), which is what the kubelet does too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any

import aiohttp.web
import attrs

from testbed.apiserver import ApiServer
from tests.images.pods import podman_env

V5, V4 = "v5.channel.k8s.io", "v4.channel.k8s.io"
STDIN, STDOUT, STDERR, ERROR, CLOSE = 0, 1, 2, 3, 255
_EXEC = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/exec$")
_FRAME = 64 * 1024
# podman exec's own failures (exit 125: podman error, 126: cannot execute, 127: not
# found) carry a message from podman/the runtime on stderr.
_NOT_RUN = re.compile(rb"executable file not found|OCI runtime|no such container|Error: ",
                      re.IGNORECASE)


def _status(code: int | None, argv: list[str], message: str = "") -> dict[str, Any]:
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    if code is None:
        return {"metadata": {}, "status": "Failure", "reason": "InternalError", "code": 500,
                "message": f"Internal error occurred: error executing command in container: "
                           f"{message}"}
    return {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "message": f"command terminated with non-zero exit code: error executing command "
                       f"{argv}, exit code {code}",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


@attrs.define(kw_only=True)
class ExecApiServer(ApiServer):
    """The API emulation with ``pods/{pod}/exec`` served by ``podman exec``."""

    #: (namespace, pod, container) -> podman container name
    containers: dict[tuple[str, str, str], str] = attrs.field(factory=dict, init=False)
    #: (namespace, pod, argv, exit code or None when it did not run), in order
    exec_log: list[tuple[str, str, list[str], int | None]] = attrs.field(factory=list,
                                                                          init=False)

    def bind(self, namespace: str, pod: str, container: str, podman_name: str) -> None:
        """Exec into ``namespace/pod``'s ``container`` runs in podman's ``podman_name``."""
        self.containers[(namespace, pod, container)] = podman_name

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        match = _EXEC.match(raw_request.path)
        if match is None or raw_request.method not in ("GET", "POST"):
            return await super().__call__(raw_request)
        self.nonresource_log.append(("exec", raw_request.path))
        return await self._exec(raw_request, match.group(1), match.group(2))

    async def _exec(self, request: aiohttp.web.BaseRequest, namespace: str,
                    pod: str) -> aiohttp.web.StreamResponse:
        query = request.rel_url.query
        argv = query.getall("command", [])
        target = self.containers.get((namespace, pod, query.get("container", "")))
        if target is None:
            return aiohttp.web.json_response(
                {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                 "reason": "NotFound", "code": 404,
                 "message": f'pods "{pod}" not found'}, status=404)
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
                   if p.strip()]
        chosen = next((p for p in offered if p in (V5, V4)), None)
        if chosen is None:
            return aiohttp.web.Response(status=403)  # x/net/websocket: no common protocol
        ws = aiohttp.web.WebSocketResponse(protocols=(chosen,), autoping=True)
        await ws.prepare(request)
        code: int | None = None
        try:
            code, message = await self._run(ws, chosen, target, argv,
                                             stdin=query.get("stdin") in ("true", "1"))
            await ws.send_bytes(bytes([ERROR]) + json.dumps(_status(code, argv, message)).encode())
            await ws.close()
        except ConnectionError:
            pass  # the client went away first
        finally:
            self.exec_log.append((namespace, pod, argv, code))
        return ws

    async def _run(self, ws: aiohttp.web.WebSocketResponse, protocol: str, container: str,
                   argv: list[str], *, stdin: bool) -> tuple[int | None, str]:
        proc = await asyncio.create_subprocess_exec(
            "podman", "exec", *(["--interactive"] if stdin else []), container, *argv,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=podman_env())
        stderr_head = bytearray()

        async def pump(stream: asyncio.StreamReader | None, channel: int) -> None:
            assert stream is not None
            while chunk := await stream.read(_FRAME):
                if channel == STDERR and len(stderr_head) < 4096:
                    stderr_head.extend(chunk[:4096])
                await ws.send_bytes(bytes([channel]) + chunk)

        feeder = asyncio.ensure_future(self._feed(ws, protocol, proc.stdin))
        try:
            await asyncio.gather(pump(proc.stdout, STDOUT), pump(proc.stderr, STDERR))
            code = await proc.wait()
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if code in (125, 126, 127) and _NOT_RUN.search(bytes(stderr_head)):
            return None, stderr_head.decode(errors="replace").strip()
        return code, ""

    @staticmethod
    async def _feed(ws: aiohttp.web.WebSocketResponse, protocol: str,
                    stdin: asyncio.StreamWriter | None) -> None:
        """Client messages to the command's stdin, until v5 closes it or the client leaves."""
        try:
            async for msg in ws:
                if msg.type not in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                    break
                data = msg.data if isinstance(msg.data, bytes) else msg.data.encode()
                if not data or stdin is None:
                    continue
                if data[0] == STDIN and len(data) > 1:
                    stdin.write(data[1:])
                    await stdin.drain()
                elif protocol == V5 and data[:2] == bytes([CLOSE, STDIN]):
                    stdin.close()
                    stdin = None
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            if stdin is not None:  # the kubelet closes stdin when the connection goes
                stdin.close()

