"""The :class:`KubernetesExecRunner`: one exec per worker thread, with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

from websocket import WebSocketBadStatusException, WebSocketException

from ..podrunner import ExecResult, PodRef, PodRunnerError, StdinUnsupportedError
from .cutloose import Attempt, install_audit_hook, worker_local
from .wire import (
    ERROR,
    EXEC_PATH,
    V4_CHANNEL_PROTOCOL,
    V4_NOTE,
    V5_CHANNEL_PROTOCOL,
    close_client,
    consume,
    drain,
    exit_code,
    lost,
    pump,
    refusal,
    send_stdin,
    ws_client,
)

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

        install_audit_hook()
        attempt = Attempt()
        deadline = time.monotonic() + timeout
        worker = asyncio.ensure_future(self._work(attempt, pod, args, data, deadline))
        # If we stop waiting (timeout, cancellation) the outcome is still
        # retrieved, so asyncio does not log "exception was never retrieved".
        worker.add_done_callback(consume)
        try:  # not asyncio.wait_for: see mailtls_operator.aio (a lost cancellation)
            async with asyncio.timeout(timeout + self._grace):
                result = await asyncio.shield(worker)
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
        attempt: Attempt,
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
        attempt: Attempt,
        pod: PodRef,
        argv: list[str],
        stdin: bytes | None,
        deadline: float,
    ) -> ExecResult:
        worker_local.attempt = attempt
        try:
            return self._exec(attempt, pod, argv, stdin, deadline)
        finally:
            worker_local.attempt = None
            attempt.release()

    def _exec(
        self,
        attempt: Attempt,
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
            raise refusal(what, exc, want_stdin) from exc
        except (WebSocketException, OSError) as exc:
            raise lost(what, attempt, exc, deadline) from exc
        try:
            if attempt.aborted:
                raise lost(what, attempt, None, deadline)
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
                    send_stdin(client, stdin, out, err, deadline)
                pump(client, out, err, deadline)
            except (WebSocketException, OSError) as exc:
                # The command may have exited and the server closed the
                # connection while we were still writing: its status counts.
                # close() marks the client closed, so read_channel() below
                # only looks at what has already arrived.
                with contextlib.suppress(Exception):
                    client.close(timeout=0)
                drain(client, out, err)
                if not client.peek_channel(ERROR):
                    raise lost(what, attempt, exc, deadline) from exc
            if time.monotonic() >= deadline and client.is_open():
                raise lost(what, attempt, None, deadline)
            returncode = exit_code(what, client.read_channel(ERROR))
            return ExecResult(returncode, bytes(out), bytes(err), notes)
        finally:
            close_client(client)

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
            resource_path=EXEC_PATH,
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
