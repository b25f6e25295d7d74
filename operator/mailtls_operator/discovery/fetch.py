"""HTTPS fetch of ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (RFC 8461 §3.3).

aiohttp with certificate verification against the system store or a given CA
file, for the name ``mta-sts.<domain>`` (SNI and host check); the connection
goes to the address that name has *in the same DNS* as the rest of discovery
(a resolver hook, so the URL, SNI and Host header stay the real ones).
Redirects are refused, only ``200`` with ``text/plain`` is accepted, the body
is capped (64 KiB) and the whole fetch is bounded in time.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import aiohttp
import aiohttp.abc

from .dns import Dns, DnsFailure
from .mtasts import MAX_POLICY_BYTES, StsError, StsPolicy, parse_policy

DEFAULT_TIMEOUT = 10.0


class FetchError(Exception):
    """The policy could not be fetched or is not acceptable; the message says why."""


def ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """Certificate and host name verification, with the system store or ``ca_file``."""
    return ssl.create_default_context(cafile=ca_file)


class _SameDns(aiohttp.abc.AbstractResolver):
    """aiohttp's name lookups answered by discovery's own DNS (``--nameserver``)."""

    def __init__(self, dns: Dns, port: int | None) -> None:
        self.dns = dns
        self.port = port

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET
                      ) -> list[aiohttp.abc.ResolveResult]:
        try:
            addresses = await self.dns.addresses(host)
        except DnsFailure as exc:
            raise OSError(str(exc)) from exc
        return [{"hostname": host, "host": a, "port": self.port or port,
                 "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for a in addresses]

    async def close(self) -> None:
        return None


def policy_url(domain: str) -> str:
    return f"https://mta-sts.{domain}/.well-known/mta-sts.txt"


async def fetch_policy(domain: str, dns: Dns, tls: ssl.SSLContext, *,
                       timeout: float = DEFAULT_TIMEOUT, max_bytes: int = MAX_POLICY_BYTES,
                       port: int | None = None) -> StsPolicy:
    """Fetch and parse the domain's policy; :class:`FetchError` with the reason otherwise.

    ``port`` is for the test world only (the CLI and the operator use 443).
    """
    url = policy_url(domain)
    connector = aiohttp.TCPConnector(ssl=tls, resolver=_SameDns(dns, port), use_dns_cache=False,
                                     force_close=True)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=client_timeout,
                                         trust_env=False) as session, \
                session.get(url, allow_redirects=False,
                            headers={"Accept": "text/plain"}) as resp:
            return parse_policy(await _body(url, resp, max_bytes))
    except aiohttp.ClientConnectorCertificateError as exc:
        raise FetchError(f"{url}: certificate not valid for mta-sts.{domain}: "
                         f"{exc.certificate_error}") from exc
    except aiohttp.ClientSSLError as exc:
        raise FetchError(f"{url}: TLS failed: {exc}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise FetchError(f"{url}: {type(exc).__name__}: {exc}") from exc
    except TimeoutError as exc:
        raise FetchError(f"{url}: no answer within {timeout:g} s") from exc
    except StsError as exc:
        raise FetchError(f"{url}: invalid policy: {exc}") from exc


async def _body(url: str, resp: Any, max_bytes: int) -> str:
    if 300 <= resp.status < 400:
        raise FetchError(f"{url}: HTTP {resp.status} redirect to "
                         f"{resp.headers.get('Location', '?')!r} refused (RFC 8461 §3.3)")
    if resp.status != 200:
        raise FetchError(f"{url}: HTTP {resp.status}")
    if resp.content_type != "text/plain":
        raise FetchError(f"{url}: Content-Type {resp.content_type!r}, not text/plain")
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise FetchError(f"{url}: {resp.content_length} bytes, over the {max_bytes}-byte limit")
    data = await resp.content.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FetchError(f"{url}: body over the {max_bytes}-byte limit")
    try:
        return str(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FetchError(f"{url}: not UTF-8 text") from exc
