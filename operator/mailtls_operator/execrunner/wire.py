"""The exec websocket's wire side, run in the worker thread: channels, stdin in chunks,
the exit status from the error channel's ``metav1.Status``, refusals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from kubernetes.stream import ws_client as _ws_client
from websocket import WebSocketBadStatusException

from ..podrunner import ExecResult, PodRunnerError, StdinUnsupportedError
from .cutloose import Attempt

# The client module is untyped; treat it as such rather than sprinkle ignores.
ws_client: Any = _ws_client


V5_CHANNEL_PROTOCOL: str = ws_client.V5_CHANNEL_PROTOCOL
V4_CHANNEL_PROTOCOL: str = ws_client.V4_CHANNEL_PROTOCOL

V4_NOTE = (
    "exec ran over v4.channel.k8s.io: this API server cannot close stdin "
    "(needs v5.channel.k8s.io, Kubernetes >= 1.30), so table updates fall back to "
    "the copy in the ConfigMap mounted in the pod"
)

EXEC_PATH = "/api/v1/namespaces/{namespace}/pods/{name}/exec"
_STDIN = ws_client.STDIN_CHANNEL
_STDOUT = ws_client.STDOUT_CHANNEL
_STDERR = ws_client.STDERR_CHANNEL
ERROR = ws_client.ERROR_CHANNEL

# stdin goes out in chunks with the incoming side drained in between: a command
# that echoes (cat) would otherwise fill both directions' buffers and deadlock
# against a client that only reads after it has written everything.
_STDIN_CHUNK = 16 * 1024

# --------------------------------------------------------------------------
# Helpers (worker thread)
# --------------------------------------------------------------------------


def send_stdin(client: Any, data: bytes, out: bytearray, err: bytearray, deadline: float) -> None:
    """Write stdin in chunks, draining output in between, then close channel 0 (v5)."""
    for start in range(0, len(data), _STDIN_CHUNK):
        if not client.is_open() or time.monotonic() >= deadline:
            return
        client.write_channel(_STDIN, data[start : start + _STDIN_CHUNK])
        client.update(timeout=0)
        drain(client, out, err)
    if client.is_open():
        client.close_channel(_STDIN)


def pump(client: Any, out: bytearray, err: bytearray, deadline: float) -> None:
    """Collect output until the server closes the websocket or the deadline passes."""
    while client.is_open():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        client.update(timeout=remaining)
        drain(client, out, err)
    drain(client, out, err)


def drain(client: Any, out: bytearray, err: bytearray) -> None:
    out += client.read_channel(_STDOUT)
    err += client.read_channel(_STDERR)


def exit_code(what: str, raw: bytes) -> int:
    """Exit status from the ``metav1.Status`` on the error channel."""
    if not raw:
        raise PodRunnerError(f"{what}: the connection ended without an exit status")
    status = _parse_status(raw)
    if status is None:
        text = raw[:300].decode("utf-8", "replace")
        raise PodRunnerError(f"{what}: unreadable status on the error channel: {text!r}")
    if status.get("status") == "Success":
        return 0
    if status.get("reason") == "NonZeroExitCode":
        details = status.get("details") or {}
        for cause in details.get("causes") or []:
            if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
                try:
                    return int(cause.get("message", ""))
                except ValueError:
                    break
    # Not an exit status: the command did not run (not found, container gone).
    raise PodRunnerError(f"{what} failed: {status.get('message') or status.get('reason')}")


def _parse_status(raw: bytes | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if isinstance(value, dict) and ("status" in value or value.get("kind") == "Status"):
        return value
    return None


def refusal(what: str, exc: WebSocketBadStatusException, want_stdin: bool) -> PodRunnerError:
    """Map a refused websocket handshake to the right error.

    With stdin we offered only v5; a server without it refuses the protocol
    with a bare 403 (no ``Status`` body), while RBAC and the like answer with a
    ``Status`` object, which we pass on.
    """
    status = _parse_status(exc.resp_body)
    if want_stdin and exc.status_code == 403 and status is None:
        return StdinUnsupportedError(
            f"{what}: the API server refused {V5_CHANNEL_PROTOCOL} (HTTP 403 without a"
            " Status); it only speaks v4 or older, where stdin cannot be closed. Nothing was"
            " started"
        )
    if status is not None:
        reason = status.get("message") or status.get("reason")
    else:
        body = (exc.resp_body or b"")[:300].decode("utf-8", "replace").strip()
        reason = body or exc.status_message
    return PodRunnerError(f"{what} refused: HTTP {exc.status_code} {reason}")


def lost(
    what: str, attempt: Attempt, exc: BaseException | None, deadline: float
) -> PodRunnerError:
    if attempt.aborted or time.monotonic() >= deadline:
        return PodRunnerError(f"{what}: timed out (no exit status before the deadline)")
    return PodRunnerError(f"{what}: connection failed: {exc}")


def close_client(client: Any) -> None:
    """Close the TCP connection now.

    ``WSClient.close()`` is not enough: after the server's close frame the
    websocket is already marked disconnected and ``close()`` returns without
    closing the socket; and on an unanswered connection a polite close would
    wait 3 s for a close frame that never comes.
    """
    ws = client.sock
    if ws is None:
        return
    with contextlib.suppress(Exception):
        ws.abort()
    with contextlib.suppress(Exception):
        ws.shutdown()


def consume(task: asyncio.Future[ExecResult]) -> None:
    if not task.cancelled():
        task.exception()
