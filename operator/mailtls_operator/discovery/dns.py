"""DNS for discovery, through dnspython: TXT, MX, TLSA (with the AD bit), addresses.

Thin I/O: each method returns the plain values the pure core decides on.  The
AD bit is asked for (RFC 6840 §5.7: AD and DO set in the query) and read from
the response header; it is only as trustworthy as the path to the resolver,
which is why DANE should be used with a validating resolver on the pod's host
or a loopback (``--nameserver``).  No cache here: the operator caches
policies, not DNS answers, so an id change is seen on the next round.
"""

from __future__ import annotations

import ipaddress
import re
import socket

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver

from .decide import DaneAnswer, TxtAnswer
from .mtasts import StsError, parse_txt

DEFAULT_TIMEOUT = 5.0


class DnsFailure(Exception):
    """A lookup that could not be answered (timeout, SERVFAIL, no nameserver)."""


def parse_nameserver(text: str) -> tuple[str, int]:
    """``HOST[:PORT]``, ``[IPv6]:PORT`` or a bare IPv6 address -> (address, port).

    Strict, because a lax reading sends the queries elsewhere: the port is 1-65535 in
    ASCII digits (``int()`` would take other scripts' digits, ``isdigit()`` even
    ``²``); ``HOST:PORT`` has one colon, so ``127.0.0.1:53:53`` is refused instead of
    being looked up as a host name.  A host name is resolved once with the system
    resolver: dnspython talks to addresses only.  Raises :class:`ValueError` with a
    readable reason (the text escaped and clipped).
    """
    shown = repr(text) if len(text) <= 80 else repr(text[:80]) + "..."
    host, port_text, has_port = text, "", False
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{shown}: expected [ADDRESS]:PORT")
        has_port, port_text = bool(rest), rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ValueError(f"{shown}: not an IPv6 address in brackets") from exc
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        has_port = True
    elif ":" in text:
        try:
            return str(ipaddress.IPv6Address(text)), 53
        except ValueError as exc:
            raise ValueError(f"{shown}: HOST:PORT has one colon; an IPv6 address with a "
                             "port is [ADDRESS]:PORT") from exc
    port = 53
    if has_port:
        if not re.fullmatch(r"[0-9]{1,5}", port_text, re.ASCII) \
                or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{shown}: port must be 1-65535 (ASCII digits)")
        port = int(port_text)
    if not host:
        raise ValueError(f"{shown}: no host")
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,253}", host, re.ASCII):
        raise ValueError(f"{shown}: not an IP address or a host name")
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)[0][4][0]), port
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"{shown}: cannot resolve {host}: {exc}") from exc


class Dns:
    """One resolver configuration, shared by every lookup of a discovery round."""

    def __init__(self, nameserver: tuple[str, int] | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        if nameserver is None:
            self.resolver = dns.asyncresolver.Resolver()
        else:
            self.resolver = dns.asyncresolver.Resolver(configure=False)
            self.resolver.nameservers = [nameserver[0]]
            self.resolver.port = nameserver[1]
        self.resolver.lifetime = timeout
        self.resolver.timeout = timeout
        self.resolver.use_edns(0, dns.flags.DO, 1232)
        self.resolver.flags = dns.flags.RD | dns.flags.AD
        self.resolver.cache = None

    async def _query(self, name: str, rdtype: str) -> tuple[list[object], bool, str]:
        """(rdata list, AD bit, why empty).  Empty with a reason for NXDOMAIN/NODATA."""
        try:
            answer = await self.resolver.resolve(name, rdtype, raise_on_no_answer=False,
                                                 search=False)
        except dns.resolver.NXDOMAIN:
            return [], False, f"{name}: NXDOMAIN"
        except (dns.exception.Timeout, dns.resolver.NoNameservers,
                dns.resolver.LifetimeTimeout) as exc:
            raise DnsFailure(f"{name} {rdtype}: {exc}") from exc
        except dns.exception.DNSException as exc:
            raise DnsFailure(f"{name} {rdtype}: {exc}") from exc
        response = answer.response
        ad = bool(isinstance(response, dns.message.Message) and response.flags & dns.flags.AD)
        rrset = answer.rrset
        if rrset is None:
            return [], ad, f"{name}: no {rdtype} record"
        return list(rrset), ad, ""

    async def sts_txt(self, domain: str) -> TxtAnswer:
        """The ``_mta-sts.<domain>`` TXT answer, as the core wants it."""
        try:
            rdatas, _, why = await self._query(f"_mta-sts.{domain}", "TXT")
        except DnsFailure as exc:
            return TxtAnswer(error=str(exc))
        texts = [b"".join(getattr(r, "strings", ())).decode("utf-8", "replace")
                 for r in rdatas]
        if not texts:
            return TxtAnswer(absent=why)
        try:
            return TxtAnswer(record=parse_txt(texts))
        except StsError as exc:
            return TxtAnswer(absent=f"_mta-sts.{domain}: {exc}")

    async def mx(self, domain: str) -> tuple[tuple[str, ...], bool]:
        """MX hosts by preference (the domain itself when it has none) and the AD bit."""
        rdatas, ad, _ = await self._query(domain, "MX")
        hosts = sorted((int(getattr(r, "preference", 0)),
                         str(getattr(r, "exchange", "")).rstrip(".").lower()) for r in rdatas)
        names = tuple(dict.fromkeys(h for _, h in hosts if h))
        return (names or (domain,)), ad

    async def dane(self, domain: str) -> DaneAnswer:
        """MX hosts and, for each, whether ``_25._tcp.<mx>`` has TLSA records and AD."""
        try:
            mx, mx_secure = await self.mx(domain)
            tlsa: dict[str, bool] = {}
            for host in mx:
                rdatas, ad, _ = await self._query(f"_25._tcp.{host}", "TLSA")
                if rdatas:
                    tlsa[host] = ad
        except DnsFailure as exc:
            return DaneAnswer(error=str(exc))
        return DaneAnswer(mx=mx, mx_secure=mx_secure, tlsa=tlsa)

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of ``host``; :class:`DnsFailure` when there is none."""
        out: list[str] = []
        for rdtype in ("A", "AAAA"):
            rdatas, _, _ = await self._query(host, rdtype)
            out.extend(str(getattr(r, "address", "")) for r in rdatas)
        if not out:
            raise DnsFailure(f"{host}: no address")
        return out
