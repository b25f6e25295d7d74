"""Cutting a stuck worker thread loose: the sockets an exec's thread created, found
through the ``socket.__new__`` audit event, shut down at the deadline."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from typing import Any

# --------------------------------------------------------------------------
# Cutting a stuck worker thread loose
# --------------------------------------------------------------------------


class Attempt:
    """The sockets one exec's worker thread has created, so they can be shut down.

    ``shutdown(SHUT_RDWR)`` (not ``close``) is the one call that safely wakes a
    thread blocked in ``connect``/``recv``/``send`` on that socket from another
    thread; the worker then fails, and closes the socket itself on the way out.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.aborted = False

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


worker_local = threading.local()
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
        attempt = getattr(worker_local, "attempt", None)
        if attempt is None:
            return
        if event == "socket.__new__":
            attempt.adopt(args[0])
        elif attempt.aborted:
            raise ConnectionAbortedError("exec abandoned: deadline passed")


def install_audit_hook() -> None:
    global _hook_installed
    with _hook_lock:
        if not _hook_installed:
            sys.addaudithook(_audit_hook)
            _hook_installed = True
