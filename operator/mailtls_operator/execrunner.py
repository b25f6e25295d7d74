"""PodRunner over the Kubernetes exec API, using the official client's websocket code.

Why it is built the way it is (DESIGN.md §7, "exec trap"):

* **stdin needs ``v5.channel.k8s.io``.**  Over ``v4.channel.k8s.io`` a client
  cannot tell the server "stdin is finished", so ``postmap -i`` / ``cat`` wait
  for ever.  v5 adds a close signal (a binary message ``0xff <channel>``),
  which ``kubernetes.stream.ws_client.WSClient.close_channel(0)`` sends when v5
  was negotiated (and silently does nothing otherwise, which is the trap).
* **When stdin is given we offer only v5.**  An API server (or the kubelet
  behind an older one) that lacks v5 then refuses the websocket handshake
  (``403`` with an empty body, from ``x/net/websocket``) *before the command
  starts*.  Had we also offered v4, the command would already be running with
  stdin open when we learn that we cannot close it, and dropping the
  connection gives it EOF on an *empty* input — ``postmap`` would happily
  build an empty table.  Either way :class:`StdinUnsupportedError` is raised
  before a byte of stdin is sent, and the rollout falls back to the table in
  the ConfigMap mounted in the pod.  Without stdin we offer v5 then v4, and a
  v4 exec says so in :attr:`ExecResult.notes`.
* **The exit status comes from the error channel (3)**, a ``metav1.Status``:
  ``Success`` is 0, ``NonZeroExitCode`` carries the code in the ``ExitCode``
  cause; any other failure (executable not found, container gone) means the
  command did not run and is a :class:`PodRunnerError`.
* **The client is synchronous and has no timeouts of its own** — its websocket
  is connected with ``timeout=None``, so a server that accepts the TCP
  connection and never answers the upgrade blocks the calling thread for ever,
  and the client exposes no handle to that socket until the handshake is done.
  Each exec runs in a worker thread (``asyncio.to_thread``) with a deadline; if
  the worker is stuck in a blocking call at the deadline, the event loop shuts
  down every socket that worker thread created (found through the
  ``socket.__new__`` audit event, see :func:`_audit_hook`), which wakes it up,
  so the thread ends and the socket is closed rather than leaked.
* **We do not use ``kubernetes.stream.stream()``**: it swaps
  ``api_client.call_api`` on the *shared* ApiClient for the duration of the
  call, which is not thread-safe — two concurrent execs can leave the ApiClient
  permanently routed to the websocket transport.  We serialise the request with
  the client's own ``ApiClient.param_serialize`` (same URL encoding and auth
  headers as the generated ``connect_get_namespaced_pod_exec``) and open it
  with ``ws_client.WSClient``, the code ``stream()`` itself uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from kubernetes.stream import ws_client as _ws_client
from websocket import WebSocketBadStatusException, WebSocketException

from mailtls_operator.podrunner import (
    ExecResult,
    PodRef,
    PodRunnerError,
    StdinUnsupportedError,
)

# The client module is untyped; treat it as such rather than sprinkle ignores.
ws_client: Any = _ws_client

__all__ = ["V4_CHANNEL_PROTOCOL", "V4_NOTE", "V5_CHANNEL_PROTOCOL", "KubernetesExecRunner"]

V5_CHANNEL_PROTOCOL: str = ws_client.V5_CHANNEL_PROTOCOL
V4_CHANNEL_PROTOCOL: str = ws_client.V4_CHANNEL_PROTOCOL

V4_NOTE = (
    "exec ran over v4.channel.k8s.io: this API server cannot close stdin "
    "(needs v5.channel.k8s.io, Kubernetes >= 1.30), so table updates fall back to "
    "the copy in the ConfigMap mounted in the pod"
)

_EXEC_PATH = "/api/v1/namespaces/{namespace}/pods/{name}/exec"
_STDIN = ws_client.STDIN_CHANNEL
_STDOUT = ws_client.STDOUT_CHANNEL
_STDERR = ws_client.STDERR_CHANNEL
_ERROR = ws_client.ERROR_CHANNEL

# stdin goes out in chunks with the incoming side drained in between: a command
# that echoes (cat) would otherwise fill both directions' buffers and deadlock
# against a client that only reads after it has written everything.
_STDIN_CHUNK = 16 * 1024


# --------------------------------------------------------------------------
# Cutting a stuck worker thread loose
# --------------------------------------------------------------------------


class _Attempt:
    """The sockets one exec's worker thread has created, so they can be shut down.

    ``shutdown(SHUT_RDWR)`` (not ``close``) is the one call that safely wakes a
    thread blocked in ``connect``/``recv``/``send`` on that socket from another
    thread; the worker then fails, and closes the socket itself on the way out.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.aborted = False
        self.abandoned = False  # nobody waits for the outcome any more

    def adopt(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            sockets = list(self._sockets)
        for sock in sockets:
            # A raw socket already wrapped by TLS is detached (fd -1): OSError.
            with contextlib.suppress(OSError, ValueError):
                sock.shutdown(socket.SHUT_RDWR)

    def release(self) -> None:
        with self._lock:
            self._sockets.clear()


_worker = threading.local()
_hook_lock = threading.Lock()
_hook_installed = False


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    """Record sockets created by exec worker threads; refuse connects once abandoned.

    The official client connects with ``timeout=None`` and gives no handle on
    the socket before the websocket handshake completes, so this is the only
    way to reach it without forking the client's connection code.  The hook is
    process-wide (audit hooks cannot be removed), so it does nothing unless the
    current thread is an exec worker, and it must never raise except on purpose.
    """
    if event == "socket.__new__" or event == "socket.connect":
        attempt = getattr(_worker, "attempt", None)
        if attempt is None:
            return
        if event == "socket.__new__":
            attempt.adopt(args[0])
        elif attempt.aborted:
            raise ConnectionAbortedError("exec abandoned: deadline passed")


def _install_audit_hook() -> None:
    global _hook_installed
    with _hook_lock:
        if not _hook_installed:
            sys.addaudithook(_audit_hook)
            _hook_installed = True


# --------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------


class KubernetesExecRunner:
    """Run argv in a pod's container through the exec API (``pods/exec``).

    ``api_client`` is a ``kubernetes.client.ApiClient`` built by the caller
    (kubeconfig or in-cluster config); its configuration supplies host, TLS
    and credentials.  The runner never mutates it, so it may be shared.

    ``abort_grace`` is how long, after ``timeout``, the event loop gives the
    worker to notice the deadline itself before shutting its sockets down,
    and then again to exit; a timed-out :meth:`run` returns within about
    ``timeout + 2 * abort_grace`` whatever the server does.
    """

    def __init__(self, api_client: Any, *, abort_grace: float = 0.5) -> None:
        if abort_grace <= 0:
            raise ValueError("abort_grace must be positive")
        self._api = api_client
        self._grace = abort_grace

    async def run(
        self,
        pod: PodRef,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        timeout: float = 60.0,
    ) -> ExecResult:
        """Run ``argv`` (no shell) in ``pod``; see :class:`~.podrunner.PodRunner`.

        Raises :class:`StdinUnsupportedError` when ``stdin`` is given and the
        server cannot close it (nothing has been sent), and
        :class:`PodRunnerError` when the command could not be run or did not
        finish within ``timeout`` seconds.
        """
        args = list(argv)
        if not args or not all(isinstance(a, str) for a in args):
            raise ValueError("argv must be a non-empty sequence of str")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        data = None if stdin is None else bytes(stdin)

        _install_audit_hook()
        attempt = _Attempt()
        deadline = time.monotonic() + timeout
        worker = asyncio.ensure_future(self._work(attempt, pod, args, data, deadline))
        # If we stop waiting (timeout, cancellation) the outcome is still
        # retrieved, so asyncio does not log "exception was never retrieved".
        worker.add_done_callback(_consume)
        try:
            result = await asyncio.wait_for(asyncio.shield(worker), timeout + self._grace)
        except TimeoutError:
            attempt.abort()
            await asyncio.wait({worker}, timeout=self._grace)
            raise PodRunnerError(
                f"exec {args[0]!r} in {pod}: timed out after {timeout:g}s"
                " (the server never answered)"
            ) from None
        finally:
            if not worker.done():  # cancelled by our caller, or timed out
                attempt.abandoned = True
                attempt.abort()
        assert result is not None  # only an abandoned worker returns None
        return result

    async def _work(
        self,
        attempt: _Attempt,
        pod: PodRef,
        argv: list[str],
        stdin: bytes | None,
        deadline: float,
    ) -> ExecResult | None:
        """The worker thread's outcome. Once :meth:`run` has stopped waiting, its
        failure is nobody's: it ends the task quietly (None), because a supervisor
        that collects leftover tasks re-raises their errors -- Kopf does so when it
        stops on SIGTERM, and the operator then exited 1 for an exec it had cut off."""
        try:
            return await asyncio.to_thread(
                self._run_in_worker, attempt, pod, argv, stdin, deadline
            )
        except Exception:
            if attempt.abandoned:
                return None
            raise

    # ---- worker thread -------------------------------------------------

    def _run_in_worker(
        self,
        attempt: _Attempt,
        pod: PodRef,
        argv: list[str],
        stdin: bytes | None,
        deadline: float,
    ) -> ExecResult:
        _worker.attempt = attempt
        try:
            return self._exec(attempt, pod, argv, stdin, deadline)
        finally:
            _worker.attempt = None
            attempt.release()

    def _exec(
        self,
        attempt: _Attempt,
        pod: PodRef,
        argv: list[str],
        stdin: bytes | None,
        deadline: float,
    ) -> ExecResult:
        want_stdin = stdin is not None
        offered = (
            (V5_CHANNEL_PROTOCOL,) if want_stdin else (V5_CHANNEL_PROTOCOL, V4_CHANNEL_PROTOCOL)
        )
        url, headers = self._request(pod, argv, want_stdin, offered)
        what = f"exec {argv[0]!r} in {pod}"
        try:
            client = ws_client.WSClient(
                self._api.configuration, url, headers, capture_all=False, binary=True
            )
        except WebSocketBadStatusException as exc:
            raise _refusal(what, exc, want_stdin) from exc
        except (WebSocketException, OSError) as exc:
            raise _lost(what, attempt, exc, deadline) from exc
        try:
            if attempt.aborted:
                raise _lost(what, attempt, None, deadline)
            protocol = client.subprotocol or ""
            notes: tuple[str, ...] = ()
            if protocol != V5_CHANNEL_PROTOCOL:
                if want_stdin:
                    raise StdinUnsupportedError(
                        f"{what}: the server answered with subprotocol {protocol or '(none)'!r}"
                        f" instead of {V5_CHANNEL_PROTOCOL}, so stdin could not be closed; no"
                        " stdin was sent, but the command may have started and will see an"
                        " empty stdin"
                    )
                notes = (V4_NOTE,)
            out, err = bytearray(), bytearray()
            try:
                if stdin is not None:
                    _send_stdin(client, stdin, out, err, deadline)
                _pump(client, out, err, deadline)
            except (WebSocketException, OSError) as exc:
                # The command may have exited and the server closed the
                # connection while we were still writing: its status counts.
                # close() marks the client closed, so read_channel() below
                # only looks at what has already arrived.
                with contextlib.suppress(Exception):
                    client.close(timeout=0)
                _drain(client, out, err)
                if not client.peek_channel(_ERROR):
                    raise _lost(what, attempt, exc, deadline) from exc
            if time.monotonic() >= deadline and client.is_open():
                raise _lost(what, attempt, None, deadline)
            returncode = _exit_code(what, client.read_channel(_ERROR))
            return ExecResult(returncode, bytes(out), bytes(err), notes)
        finally:
            _close(client)

    def _request(
        self, pod: PodRef, argv: list[str], want_stdin: bool, offered: tuple[str, ...]
    ) -> tuple[str, dict[str, str]]:
        """The exec URL and headers, serialised as ``connect_get_namespaced_pod_exec`` does.

        ``command`` is a repeated query parameter, one per argv element (no
        shell, no joining); stdout/stderr are always wanted, tty never.
        """
        query: list[tuple[str, Any]] = [
            ("command", argv),
            ("container", pod.container),
            ("stdin", want_stdin),
            ("stdout", True),
            ("stderr", True),
            ("tty", False),
        ]
        _method, url, headers, _body, _post = self._api.param_serialize(
            method="GET",
            resource_path=_EXEC_PATH,
            path_params={"namespace": pod.namespace, "name": pod.name},
            query_params=query,
            header_params={},
            auth_settings=["BearerToken"],
            collection_formats={"command": "multi"},
        )
        # create_websocket forwards only these two (lower-case) headers.
        sent = {"sec-websocket-protocol": ",".join(offered)}
        for key, value in (headers or {}).items():
            if key.lower() == "authorization" and value:
                sent["authorization"] = str(value)
        return str(ws_client.get_websocket_url(url)), sent


# --------------------------------------------------------------------------
# Helpers (worker thread)
# --------------------------------------------------------------------------


def _send_stdin(client: Any, data: bytes, out: bytearray, err: bytearray, deadline: float) -> None:
    """Write stdin in chunks, draining output in between, then close channel 0 (v5)."""
    for start in range(0, len(data), _STDIN_CHUNK):
        if not client.is_open() or time.monotonic() >= deadline:
            return
        client.write_channel(_STDIN, data[start : start + _STDIN_CHUNK])
        client.update(timeout=0)
        _drain(client, out, err)
    if client.is_open():
        client.close_channel(_STDIN)


def _pump(client: Any, out: bytearray, err: bytearray, deadline: float) -> None:
    """Collect output until the server closes the websocket or the deadline passes."""
    while client.is_open():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        client.update(timeout=remaining)
        _drain(client, out, err)
    _drain(client, out, err)


def _drain(client: Any, out: bytearray, err: bytearray) -> None:
    out += client.read_channel(_STDOUT)
    err += client.read_channel(_STDERR)


def _exit_code(what: str, raw: bytes) -> int:
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


def _refusal(what: str, exc: WebSocketBadStatusException, want_stdin: bool) -> PodRunnerError:
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


def _lost(
    what: str, attempt: _Attempt, exc: BaseException | None, deadline: float
) -> PodRunnerError:
    if attempt.aborted or time.monotonic() >= deadline:
        return PodRunnerError(f"{what}: timed out (no exit status before the deadline)")
    return PodRunnerError(f"{what}: connection failed: {exc}")


def _close(client: Any) -> None:
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


def _consume(task: asyncio.Future[ExecResult | None]) -> None:
    if not task.cancelled():
        task.exception()
