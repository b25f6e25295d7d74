"""An HTTPS proxy in front of the test bed's kube-apiserver that fails on request: an API
outage for the clients pointed at it (a Postfix pod's agent) while the test and the
operator keep talking to the real server.

Outages, as a pod sees them during a control-plane upgrade or a network fault:

- :meth:`FaultProxy.fail`: every request is answered with an error status (503 by
  default, a Kubernetes ``Status`` body, as kube-apiserver answers when etcd is gone);
- :meth:`FaultProxy.hang`: requests are accepted and never answered (until
  :meth:`FaultProxy.clear`), so the client's own timeout is what ends them;
- :meth:`FaultProxy.cut`: every response still streaming (a watch) breaks off, its
  connection closed mid-stream.

Otherwise a request goes through unchanged (its ``Authorization`` too: the server
authenticates the client, not the proxy) and the answer streams back chunk by chunk.
The proxy serves TLS with the control plane's own serving certificate (it names
127.0.0.1), so the client verifies it against the test bed's CA as it would the server.
It runs in a thread with its own event loop, so faults are set from any thread or loop
and a hung request never holds the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from .controlplane import ControlPlane

T = TypeVar("T")
#: Not forwarded: they describe one hop, and the proxy makes its own connections.
HOP_HEADERS = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "upgrade",
                         "content-length", "accept-encoding", "proxy-connection", "te"})


class FaultProxy:
    """``https://127.0.0.1:<port>`` in front of ``plane``; a context manager."""

    def __init__(self, plane: ControlPlane) -> None:
        assert plane.pki is not None, "start the control plane first"
        self.plane = plane
        self.url = ""
        #: requests received (answered or not)
        self.requests = 0
        self._status: int | None = None
        self._hanging = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy",
                                        daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._resumed: asyncio.Event | None = None
        self._streaming: dict[int, web.BaseRequest] = {}  # by id(): requests are not hashable

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        """Stop serving (open requests are ended), close the loop, join the thread."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._stop(), timeout=15.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    # -- faults ------------------------------------------------------------------------

    def fail(self, status: int = 503) -> None:
        """Answer every request from now on with ``status``."""
        self._status, self._hanging = status, False
        self._loop.call_soon_threadsafe(self._release)

    def hang(self) -> None:
        """Accept every request from now on and answer none until :meth:`clear`."""
        self._status, self._hanging = None, True
        self._loop.call_soon_threadsafe(self._hold)

    def clear(self) -> None:
        """Forward again; requests held by :meth:`hang` go through now."""
        self._status, self._hanging = None, False
        self._loop.call_soon_threadsafe(self._release)

    def cut(self) -> int:
        """Break off every response still streaming; returns how many."""
        return self._call(self._cut())

    # -- the loop's side ---------------------------------------------------------------

    async def _start(self) -> None:
        pki = self.plane.pki
        assert pki is not None
        serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        serving.load_cert_chain(str(pki.serving_cert), str(pki.serving_key))
        upstream = ssl.create_default_context(cafile=str(self.plane.ca_file))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=upstream), auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        self._resumed = asyncio.Event()
        self._resumed.set()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handlers still running at stop (held by hang()) are cancelled below: no grace
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=serving)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"https://{host}:{port}"

    async def _stop(self) -> None:
        await self._cut()
        self._release()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        # whatever still runs (a handler the server did not wait for) ends with the loop
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def _hold(self) -> None:
        assert self._resumed is not None
        self._resumed.clear()

    def _release(self) -> None:
        assert self._resumed is not None
        self._resumed.set()

    async def _cut(self) -> int:
        cut = list(self._streaming.values())
        self._streaming.clear()
        for request in cut:
            if request.transport is not None:
                request.transport.abort()
        return len(cut)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        assert self._resumed is not None and self._session is not None
        await self._resumed.wait()
        if self._status is not None:
            return web.json_response(
                {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                 "message": f"fault proxy: injected {self._status}", "code": self._status},
                status=self._status)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        body = await request.read()
        async with self._session.request(request.method, self.plane.url + request.path_qs,
                                         headers=headers, data=body or None) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS})
            await response.prepare(request)
            self._streaming[id(request)] = request
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            finally:
                self._streaming.pop(id(request), None)
        return response
