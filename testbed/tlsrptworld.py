"""What a Postfix 3.10 instance needs to emit TLSRPT datagrams on loopback, and their capture.

Postfix only reports TLS sessions towards a domain that publishes a TLSRPT
policy (``_smtp._tls.<domain>`` TXT), and it finds that policy with the
resolver library, which reads ``/etc/resolv.conf`` and cannot be pointed at a
port other than 53.  So the DNS server here listens on port 53 of a loopback
address of its own (``127.53.x.y``, picked at random so that concurrent test
runs do not collide), and the instance's smtp client, chrooted in its queue
directory by ``InstanceSettings.hosts``, gets ``etc/resolv.conf`` naming it.

:class:`DatagramTrap` binds the unix datagram socket at the path Postfix sends
to (``smtp_tlsrpt_socket_name``, relative to the queue directory) and keeps
what arrives, as raw bytes: the measured format is documented in
``docs/tlsrpt.md``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shlex
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from dnslib import MX, TXT, A
from dnslib.server import DNSLogger, DNSServer

from .instance import LocalInstance
from .layout import InstanceSettings
from .stsworld import Zone, _ZoneResolver

__all__ = ["SOCKET_NAME", "DatagramTrap", "Port53Dns", "datagram", "postfix_wrappers",
           "reporting_instance", "tlsrpt_record", "write_resolv_conf"]

POSTFIX_TOOLS = ("postconf", "postmap", "postqueue", "postfix", "posttls-finger", "postsuper")
"""The Postfix commands an agent runs in its pod."""


class _AskedResolver(_ZoneResolver):
    """The zone resolver, remembering every name asked (what Postfix looked up)."""

    def __init__(self, zone: Zone, asked: list[str]) -> None:
        super().__init__(zone)
        self.asked = asked

    def resolve(self, request: Any, handler: Any) -> Any:
        self.asked.append(str(request.q.qname).rstrip(".").lower())
        return super().resolve(request, handler)


class Port53Dns:
    """An authoritative DNS server on UDP and TCP port 53 of a random 127.53.x.y."""

    def __init__(self, attempts: int = 20) -> None:
        self.zone = Zone()
        self.asked: list[str] = []
        quiet = DNSLogger(log="-request,-reply,-truncated,-error", logf=lambda *_: None)
        last: OSError | None = None
        for _ in range(attempts):
            address = f"127.53.{random.randint(0, 255)}.{random.randint(1, 254)}"
            try:
                udp = DNSServer(_AskedResolver(self.zone, self.asked), port=53,
                                address=address, logger=quiet)
            except OSError as exc:
                last = exc
                continue
            try:
                tcp = DNSServer(_AskedResolver(self.zone, self.asked), port=53,
                                address=address, tcp=True, logger=quiet)
            except OSError as exc:
                udp.server.server_close()
                last = exc
                continue
            self.address, self._udp, self._tcp = address, udp, tcp
            return
        raise OSError(errno.EADDRINUSE, f"no 127.53.x.y:53 free for DNS: {last}")

    def mail_domain(self, domain: str, *, tlsrpt: str | None, ip: str = "127.0.0.1") -> None:
        """``domain`` MX ``mx.<domain>`` (A ``ip``); ``tlsrpt``: its ``_smtp._tls`` TXT."""
        self.zone.set(domain, "MX", MX(f"mx.{domain}", 10))
        self.host(f"mx.{domain}", ip)
        if tlsrpt is not None:
            self.txt(f"_smtp._tls.{domain}", tlsrpt)

    def txt(self, name: str, text: str) -> None:
        self.zone.set(name, "TXT", TXT(text))

    def host(self, name: str, ip: str = "127.0.0.1") -> None:
        self.zone.set(name, "A", A(ip))
        self.zone.set(name, "AAAA")  # known, no IPv6 address: NOERROR, empty

    def start(self) -> Self:
        self._udp.start_thread()
        self._tcp.start_thread()
        return self

    def stop(self) -> None:
        for server in (self._udp, self._tcp):
            with contextlib.suppress(Exception):
                server.stop()
            server.server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


SOCKET_NAME = "tlsrpt/sock"
"""``smtp_tlsrpt_socket_name`` of a reporting instance: relative to its queue directory."""


def tlsrpt_record(domain: str) -> str:
    """The ``_smtp._tls`` TXT record the test bed's domains publish."""
    return f"v=TLSRPTv1; rua=mailto:tlsrpt@{domain}"


def datagram(domain: str, failure: int | None = None, reason: str | None = None) -> bytes:
    """One session to ``domain`` as Postfix 3.10 with libtlsrpt 0.5.0rc1 sends it (the
    measured format, docs/tlsrpt.md): a success, or ``failure`` (the RFC 8460 code, e.g.
    204 certificate-expired) with OpenSSL's ``reason``.  For a collector fed without a
    Postfix 3.10 (one that cannot run, or load beyond what one instance sends)."""
    policy: dict[str, Any] = {"policy-type": 9, "policy-domain": domain, "t": 0, "f": 0}
    if failure is not None:
        detail: dict[str, Any] = {"c": failure, "s": "127.0.0.1", "n": f"mx.{domain}",
                                  "h": "250-sink.mailtls.test\r\n250 HELP", "r": "127.0.0.1"}
        if reason:
            detail["f"] = reason
        policy.update({"failure-details": [detail], "t": 1, "f": 1})
    return json.dumps({"d": domain, "pr": tlsrpt_record(domain), "policies": [policy]}).encode()


def reporting_instance(base: Path, name: str, dns: Port53Dns, routes: Mapping[str, str],
                       policy: Mapping[str, str], ca_file: str, **main_cf: str
                       ) -> LocalInstance:
    """A created (not started) Postfix 3.10 instance in ``base/name`` that reports TLSRPT
    to ``SOCKET_NAME``, resolves through ``dns`` (its smtp client chrooted, with the jail's
    ``etc/resolv.conf``), trusts ``ca_file`` and routes ``routes`` (domain ->
    ``transport:nexthop``, the site's own transport table)."""
    extra = {"smtp_tlsrpt_enable": "yes", "smtp_tlsrpt_socket_name": SOCKET_NAME,
             "smtp_tls_CAfile": ca_file, "smtp_tls_security_level": "may",
             # a reused (cached) TLS connection has no handshake, hence no datagram
             # (smtp_tlsrpt_skip_reused_handshakes = yes): one connection per message here
             "smtp_connection_cache_on_demand": "no", **main_cf}
    settings = InstanceSettings(name=name, postfix="3.10", smtp_dns_support_level="enabled",
                                hosts={"jail.invalid": "127.0.0.1"},  # chroot smtp: own resolv
                                routes=dict(routes), extra_main_cf=extra)
    inst = LocalInstance(base / name, settings)
    inst.create(tls_policy="".join(f"{k} {v}\n" for k, v in policy.items()))
    write_resolv_conf(inst.queue_dir, dns.address)
    return inst


def postfix_wrappers(inst: LocalInstance, directory: Path) -> Path | None:
    """A directory for ``mailtls agent --postfix-path``: one wrapper per Postfix tool that
    runs it inside the instance's 3.10 root (:mod:`.postfixroot`), so an agent run as a
    process of this machine uses its pod's Postfix as in a container; None for 3.7 (the
    machine's own).  ``directory`` must lie outside the instance's base directory, which
    the root sees at the same path: a wrapper found inside the root would call itself."""
    if inst.settings.postfix == "3.7":
        return None
    directory.mkdir(parents=True, exist_ok=True)
    for tool in POSTFIX_TOOLS:
        wrapper = directory / tool
        wrapper.write_text("#!/bin/sh\nexec " + shlex.join(inst.command([f"/usr/sbin/{tool}"]))
                           + ' "$@"\n')
        wrapper.chmod(0o755)
    return directory


def write_resolv_conf(queue_dir: Path, nameserver: str) -> None:
    """``etc/resolv.conf`` in the smtp client's chroot jail (the queue directory)."""
    etc = queue_dir / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "resolv.conf").write_text(f"nameserver {nameserver}\noptions timeout:1 attempts:2\n")


class DatagramTrap:
    """A unix datagram socket at ``path`` that anyone (user postfix) may send to."""

    def __init__(self, path: Path, *, max_size: int = 1 << 16) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o755)
        path.unlink(missing_ok=True)
        self.path = path
        self.max_size = max_size
        self.received: list[bytes] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o666)

    def collect(self, count: int, timeout: float) -> list[bytes]:
        """Read until ``count`` datagrams arrived in all, or ``timeout`` passed; return all."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._sock.settimeout(min(left, 0.2))
            with contextlib.suppress(TimeoutError):
                self.received.append(self._sock.recv(self.max_size))
        return list(self.received)

    def close(self) -> None:
        self._sock.close()
        self.path.unlink(missing_ok=True)
