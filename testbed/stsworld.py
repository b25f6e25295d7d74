"""A loopback world for discovery: an authoritative DNS server and an HTTPS server.

For tests, ``make demo`` and ``bench``: dnslib serves a zone held in plain
dicts (edit them between rounds: a new TXT id, a SERVFAIL, a signed name that
answers with the AD bit), and a threaded HTTPS server with a certificate from
a trustme CA serves ``/.well-known/mta-sts.txt`` per ``Host``.  Both run in
background threads, so they work under pytest-asyncio, from a subprocess
test of the CLI, and from a plain script.  Needs the test extras (dnslib,
trustme).
"""

from __future__ import annotations

import http.server
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import trustme
from dnslib import AAAA, MX, QTYPE, RCODE, RR, TLSA, TXT, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer


@dataclass
class Page:
    """What the HTTPS server answers for one ``mta-sts.<domain>`` host."""

    body: bytes = b""
    status: int = 200
    content_type: str = "text/plain"
    location: str = ""


@dataclass
class Zone:
    """Records by (name, type); names answered with AD; names answered with SERVFAIL."""

    records: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    signed: set[str] = field(default_factory=set)
    servfail: set[str] = field(default_factory=set)
    queries: int = 0

    def set(self, name: str, rtype: str, *rdatas: Any) -> None:
        self.records[(name.lower().rstrip("."), rtype)] = list(rdatas)

    def drop(self, name: str, rtype: str) -> None:
        self.records.pop((name.lower().rstrip("."), rtype), None)


class _ZoneResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, zone: Zone) -> None:
        self.zone = zone

    def resolve(self, request: Any, handler: Any) -> Any:
        self.zone.queries += 1
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        rtype = QTYPE[request.q.qtype]
        if name in self.zone.servfail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        known = any(n == name for n, _ in self.zone.records)
        for rdata in self.zone.records.get((name, rtype), []):
            reply.add_answer(RR(name, getattr(QTYPE, rtype), rdata=rdata, ttl=60))
        if not known:
            reply.header.rcode = RCODE.NXDOMAIN
        reply.header.ad = 1 if name in self.zone.signed else 0
        return reply


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HttpsServer

    def do_GET(self) -> None:
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        page = self.server.pages.get(host)
        self.server.hits.append((host, self.path))
        if page is None or self.path != "/.well-known/mta-sts.txt":
            self.send_error(404)
            return
        self.send_response(page.status)
        self.send_header("Content-Type", page.content_type)
        if page.location:
            self.send_header("Location", page.location)
        self.send_header("Content-Length", str(len(page.body)))
        self.end_headers()
        self.wfile.write(page.body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


class _HttpsServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    pages: dict[str, Page]
    hits: list[tuple[str, str]]


def _dns_pair(zone: Zone, address: str) -> tuple[DNSServer, DNSServer]:
    """UDP and TCP servers on one free port (retried: the UDP port may be taken on TCP)."""
    quiet = DNSLogger(log="-request,-reply,-truncated,-error", logf=lambda *_: None)
    for _ in range(20):
        udp = DNSServer(_ZoneResolver(zone), port=0, address=address, logger=quiet)
        port = udp.server.server_address[1]
        try:
            tcp = DNSServer(_ZoneResolver(zone), port=port, address=address, tcp=True,
                            logger=quiet)
        except OSError:
            udp.server.server_close()
            continue
        return udp, tcp
    raise OSError(f"no port free for both UDP and TCP on {address}")


def policy_body(mode: str, mx: list[str], max_age: int) -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return ("\r\n".join(lines) + "\r\n").encode()


class StsWorld:
    """DNS on ``address:dns_port`` (UDP and TCP), HTTPS on ``address:https_port``.

    ``cert_names`` are the names the HTTPS certificate is valid for; a domain
    whose ``mta-sts.`` name is not among them gets the wrong certificate.
    """

    def __init__(self, cert_names: list[str], *, address: str = "127.0.0.1",
                 https_port: int = 0) -> None:
        self.address = address
        self.zone = Zone()
        self.ca = trustme.CA()
        self._dir = tempfile.TemporaryDirectory(prefix="stsworld-")
        self.ca_file = str(Path(self._dir.name) / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        cert = self.ca.issue_cert(*cert_names)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        self.https = _HttpsServer((address, https_port), _Handler)
        self.https.pages = {}
        self.https.hits = []
        self.https.socket = ctx.wrap_socket(self.https.socket, server_side=True)
        self.dns_udp, self.dns_tcp = _dns_pair(self.zone, address)
        self._threads: list[threading.Thread] = []

    @property
    def dns_port(self) -> int:
        return int(self.dns_udp.server.server_address[1])

    @property
    def https_port(self) -> int:
        return int(self.https.server_address[1])

    @property
    def nameserver(self) -> str:
        return f"{self.address}:{self.dns_port}"

    def publish_sts(self, domain: str, *, id: str, mode: str = "enforce",
                    mx: list[str] | None = None, max_age: int = 86400) -> None:
        """TXT record, the ``mta-sts.`` address and the policy page for ``domain``."""
        self.zone.set(f"_mta-sts.{domain}", "TXT", TXT(f"v=STSv1; id={id};"))
        self.zone.set(f"mta-sts.{domain}", "A", A(self.address))
        self.https.pages[f"mta-sts.{domain}"] = Page(
            policy_body(mode, mx or [f"mx.{domain}"], max_age))

    def publish_mx(self, domain: str, *hosts: str, tlsa: bool = False,
                   signed: bool = False) -> None:
        """MX records (and, with ``tlsa``, ``_25._tcp`` TLSA records); ``signed``: AD bit."""
        self.zone.set(domain, "MX", *(MX(h, 10 * (i + 1)) for i, h in enumerate(hosts)))
        if signed:
            self.zone.signed.add(domain)
        for host in hosts:
            self.zone.set(host, "A", A(self.address))
            self.zone.set(host, "AAAA")
            if tlsa:
                self.zone.set(f"_25._tcp.{host}", "TLSA", TLSA(3, 1, 1, b"\x11" * 32))
                if signed:
                    self.zone.signed.add(f"_25._tcp.{host}")

    def page(self, domain: str) -> Page:
        return self.https.pages[f"mta-sts.{domain}"]

    def start(self) -> Self:
        for serve in (self.https.serve_forever, self.dns_udp.server.serve_forever,
                      self.dns_tcp.server.serve_forever):
            thread = threading.Thread(target=serve, kwargs={"poll_interval": 0.05},
                                      daemon=True, name="stsworld")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self.https.shutdown()
        self.https.server_close()
        for server in (self.dns_udp, self.dns_tcp):
            server.server.shutdown()
            server.server.server_close()
        self._dir.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["AAAA", "DNSRecord", "Page", "StsWorld", "Zone", "policy_body"]
