"""The agent's few API calls: get and watch its ConfigMaps, patch its own pod.

urllib3 (the HTTP library under the official client) rather than the client
itself or aiohttp: the agent runs in every mail pod, and importing either of
those costs more memory than the whole rest of the agent (measured in ``make
bench``: an agent on aiohttp was 42 MiB, over the 40 MiB budget).  Blocking
calls run in a worker thread; a watch is read by a thread of its own and
aborted at once (``HTTPResponse.shutdown``) when the agent stops or the
caller gives up.  Every call is bounded in time; any failure to reach the
server is :class:`ApiUnavailable`.

Credentials: in a pod, the service-account files the kubelet projects
(``token``, re-read every minute because bound tokens rotate; ``ca.crt``) and
``KUBERNETES_SERVICE_HOST``/``_PORT`` -- the in-cluster contract client-go and
the official client implement; ``--kubeconfig`` (development) goes through the
official client's loader instead.

The calls, which the chart's Role grants and nothing more (``API_CALLS``):
``get``/``watch`` ConfigMaps by name (the watch carries
``fieldSelector=metadata.name=…``, the only form RBAC's ``resourceNames``
allows), and a JSON merge patch of the agent's own pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import urllib3

MERGE = "application/merge-patch+json"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
API_CALLS: frozenset[tuple[str, str, str]] = frozenset({
    ("get", "", "configmaps"),
    ("watch", "", "configmaps"),
    ("patch", "", "pods"),
})
_TOKEN_TTL = 60.0


class ApiUnavailable(Exception):
    """The API server could not be reached or answered with an error."""


class NotFound(ApiUnavailable):
    """404: the object does not exist (yet)."""


class Expired(ApiUnavailable):
    """410: the watch position is gone; read again."""


class AgentApi:
    """A base URL, a credential source and a small urllib3 pool."""

    def __init__(self, url: str, *, token: Callable[[], str | None] | None = None,
                 ca_file: str | None = None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._token = token or (lambda: None)
        self.timeout = timeout
        self.pool = urllib3.PoolManager(num_pools=1, maxsize=4, ca_certs=ca_file,
                                        cert_reqs="CERT_REQUIRED" if ca_file else None)
        self.requests = 0
        """How many requests this agent made (the bench counts them per rollout)."""

    @classmethod
    def in_cluster(cls, *, timeout: float = 10.0, sa_dir: Path = SA_DIR) -> AgentApi:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get(
            "KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise ApiUnavailable("not in a pod (KUBERNETES_SERVICE_HOST/PORT unset): "
                                 "give --api-url or --kubeconfig")
        cached: list[Any] = [None, 0.0]

        def token() -> str | None:
            if time.monotonic() - cached[1] > _TOKEN_TTL:
                cached[0] = (sa_dir / "token").read_text(encoding="ascii").strip()
                cached[1] = time.monotonic()
            return str(cached[0])

        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", token=token, ca_file=str(sa_dir / "ca.crt"),
                   timeout=timeout)

    @classmethod
    def from_kubeconfig(cls, path: str, *, timeout: float = 10.0) -> AgentApi:
        """Development only: the official loader (heavy to import, so not in a pod)."""
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, client_configuration=cfg)
        # the loader files a kubeconfig token under "BearerToken" (kubernetes >= 30),
        # older ones under "authorization": without either key the agent was anonymous
        def token() -> str | None:
            for key in ("BearerToken", "authorization"):
                found: str | None = cfg.get_api_key_with_prefix(key)
                if found:
                    return found
            return None
        return cls(cfg.host, token=token, ca_file=cfg.ssl_ca_cert, timeout=timeout)

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self._token()
        if token:
            headers["Authorization"] = token if token.startswith("Bearer ") else \
                f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def close(self) -> None:
        self.pool.clear()

    async def _json(self, method: str, path: str, body: bytes | None = None,
                    content_type: str | None = None) -> dict[str, Any]:
        self.requests += 1

        def call() -> dict[str, Any]:
            resp = self.pool.request(method, self.url + path, body=body,
                                     headers=self._headers(content_type), retries=False,
                                     timeout=urllib3.Timeout(total=self.timeout))
            _raise_for(resp.status, resp.data, f"{method} {path}")
            data: dict[str, Any] = json.loads(resp.data or b"{}")
            return data

        try:
            return await asyncio.to_thread(call)
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise ApiUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._json("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}")

    async def patch_pod_annotations(self, namespace: str, name: str,
                                    annotations: dict[str, str]) -> None:
        body = json.dumps({"metadata": {"annotations": annotations}}).encode()
        await self._json("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}", body, MERGE)

    async def watch_configmap(self, namespace: str, name: str, resource_version: str, *,
                              timeout_seconds: int = 300
                              ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(type, object) events of one ConfigMap from ``resource_version`` (BOOKMARKs too).
        Ends when the server closes the stream; raises :class:`Expired` on 410."""
        self.requests += 1
        path = (f"/api/v1/namespaces/{namespace}/configmaps?watch=true"
                f"&fieldSelector={quote('metadata.name=' + name)}"
                f"&resourceVersion={quote(resource_version)}&allowWatchBookmarks=true"
                f"&timeoutSeconds={timeout_seconds}")

        def open_stream() -> urllib3.BaseHTTPResponse:
            resp = self.pool.request(
                "GET", self.url + path, headers=self._headers(), retries=False,
                preload_content=False,
                timeout=urllib3.Timeout(connect=self.timeout,
                                        read=timeout_seconds + self.timeout))
            if resp.status != 200:
                data = resp.read()
                resp.release_conn()
                _raise_for(resp.status, data, f"watch {name}")
            return resp

        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(None, open_stream)
        try:
            resp = await asyncio.shield(opening)
        except asyncio.CancelledError:  # the stream still opens in its thread: close it then
            opening.add_done_callback(_close_opened)
            raise
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiUnavailable(f"watch {name}: {type(exc).__name__}: {exc}") from exc
        lines: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()

        def put(item: bytes | BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
                loop.call_soon_threadsafe(lines.put_nowait, item)

        def read() -> None:  # one thread per open watch; ends when the stream does
            pending = b""
            try:  # read1: whatever has arrived, so an event is never held back in a buffer
                while chunk := resp.read1(65536):
                    *complete, pending = (pending + chunk).split(b"\n")
                    for line in complete:
                        put(line)
                put(pending or None)
                if pending:
                    put(None)
            except Exception as exc:  # handed to the loop, not lost
                put(exc)

        threading.Thread(target=read, name=f"mailtls-agent-watch:{name}", daemon=True).start()
        try:
            while (line := await lines.get()) is not None:
                if isinstance(line, BaseException):
                    raise ApiUnavailable(f"watch {name}: {type(line).__name__}: {line}")
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    if obj.get("code") == 410:
                        raise Expired(f"watch {name}: {obj.get('message', '410')}")
                    raise ApiUnavailable(f"watch {name}: {obj.get('message', obj)}")
                yield str(event.get("type")), obj
        except ValueError as exc:
            raise ApiUnavailable(f"watch {name}: bad event: {exc}") from exc
        finally:
            with contextlib.suppress(RuntimeError):  # RuntimeError: the stream had ended
                resp.shutdown()  # unblocks the reading thread at once
            resp.release_conn()


def _close_opened(opening: asyncio.Future[urllib3.BaseHTTPResponse]) -> None:
    """A watch opened after its caller gave up: end it, so no connection stays open."""
    if opening.cancelled() or opening.exception() is not None:
        return
    resp = opening.result()
    with contextlib.suppress(RuntimeError):
        resp.shutdown()
    resp.release_conn()


def _raise_for(status: int, body: bytes, what: str) -> None:
    if status < 300:
        return
    try:
        message = json.loads(body).get("message", "")
    except (ValueError, AttributeError):
        message = body[:200].decode("utf-8", "replace")
    text = f"{what}: {status} {message}".strip()
    if status == 404:
        raise NotFound(text)
    if status == 410:
        raise Expired(text)
    raise ApiUnavailable(text)
