"""The agent's few API calls, over aiohttp: get and watch its ConfigMaps, patch its own pod.

aiohttp rather than the synchronous official client: a watch must be
cancellable at once (shutdown, outage detection) and the agent must stay
small.  The credentials come from the official client's configuration loader
(in-cluster service-account token, refreshed, and CA), so nothing about
authentication is hand-written here.  Every call is bounded in time; any
failure to reach the server is :class:`ApiUnavailable`.

The calls, which the chart's Role grants and nothing more (``API_CALLS``):
``get``/``watch`` ConfigMaps by name (the watch carries
``fieldSelector=metadata.name=…``, the only form RBAC's ``resourceNames``
allows), and a JSON merge patch of the agent's own pod.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp

MERGE = "application/merge-patch+json"
API_CALLS: frozenset[tuple[str, str, str]] = frozenset({
    ("get", "", "configmaps"),
    ("watch", "", "configmaps"),
    ("patch", "", "pods"),
})


class ApiUnavailable(Exception):
    """The API server could not be reached or answered with an error."""


class NotFound(ApiUnavailable):
    """404: the object does not exist (yet)."""


class Expired(ApiUnavailable):
    """410: the watch position is gone; read again."""


class AgentApi:
    """A base URL, headers and TLS settings; one aiohttp session."""

    def __init__(self, url: str, *, token: str | None = None,
                 ssl_context: ssl.SSLContext | bool = True, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.ssl = ssl_context
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0
        """How many requests this agent made (the bench counts them per rollout)."""

    @classmethod
    def from_kubernetes(cls, kubeconfig: str | None = None, *,
                        timeout: float = 10.0) -> AgentApi:
        """In-cluster service account (or a kubeconfig file), via the official loader."""
        from kubernetes import client, config

        cfg = client.Configuration()
        if kubeconfig:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=cfg)
        else:
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=cfg)
        ctx: ssl.SSLContext | bool = True
        if cfg.ssl_ca_cert:
            ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        api = cls(cfg.host, ssl_context=ctx, timeout=timeout)
        api._configuration = cfg
        return api

    _configuration: Any = None

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        auth = None
        if self._configuration is not None:  # refreshed by the loader's hook
            auth = self._configuration.get_api_key_with_prefix("authorization")
        elif self.token:
            auth = f"Bearer {self.token}"
        if auth:
            headers["Authorization"] = auth
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        self.requests += 1
        try:
            async with self._client().request(
                    method, self.url + path, ssl=self.ssl,
                    timeout=aiohttp.ClientTimeout(total=self.timeout), **kwargs) as resp:
                body = await resp.read()
                _raise_for(resp.status, body, f"{method} {path}")
                data: dict[str, Any] = json.loads(body or b"{}")
                return data
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ApiUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._json("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}",
                                headers=self._headers())

    async def patch_pod_annotations(self, namespace: str, name: str,
                                    annotations: dict[str, str]) -> None:
        body = json.dumps({"metadata": {"annotations": annotations}})
        await self._json("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}", data=body,
                         headers=self._headers(MERGE))

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
        try:
            async with self._client().get(
                    self.url + path, ssl=self.ssl, headers=self._headers(),
                    timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout,
                                                  sock_read=timeout_seconds + self.timeout),
                    ) as resp:
                if resp.status != 200:
                    _raise_for(resp.status, await resp.read(), f"watch {name}")
                async for line in resp.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        code = obj.get("code")
                        if code == 410:
                            raise Expired(f"watch {name}: {obj.get('message', '410')}")
                        raise ApiUnavailable(f"watch {name}: {obj.get('message', code)}")
                    yield str(event.get("type")), obj
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ApiUnavailable(f"watch {name}: {type(exc).__name__}: {exc}") from exc


def _raise_for(status: int, body: bytes, what: str) -> None:
    if status < 300:
        return
    try:
        message = json.loads(body).get("message", "")
    except ValueError:
        message = body[:200].decode("utf-8", "replace")
    text = f"{what}: {status} {message}".strip()
    if status == 404:
        raise NotFound(text)
    if status == 410:
        raise Expired(text)
    raise ApiUnavailable(text)
