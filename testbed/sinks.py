"""SMTP sinks on loopback: the destinations the local Postfix delivers to.

Three kinds, matching what a TLS policy distinguishes:

- :func:`plain_sink`: no STARTTLS at all (``encrypt`` must defer);
- :func:`starttls_sink` with a self-signed certificate (``encrypt`` delivers,
  ``secure`` must defer: untrusted);
- :func:`starttls_sink` with a certificate issued by a :class:`LocalCA` whose
  PEM is written to a file for ``tafile=`` (``secure match=NAME tafile=CA``
  delivers over a verified connection).

Each sink records every message with its envelope and whether the session
was encrypted, so a test proves what Postfix did on the wire rather than
trusting its log alone.  aiosmtpd serves from a background thread, so sinks
work the same under pytest-asyncio and from a plain script.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .instance import free_port

_VALIDITY = dt.timedelta(days=2)


@dataclass(frozen=True)
class Received:
    """A message as the sink received it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    tls: bool
    cipher: str | None
    smtputf8: bool
    helo: str | None


@dataclass(frozen=True)
class CertFiles:
    """A certificate chain and its key on disk, for an ``ssl.SSLContext``."""

    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(hostname: str) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    names.append(x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")))
    return x509.SubjectAlternativeName(names)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _leaf_builder(hostname: str, key: ec.EllipticCurvePrivateKey,
                  expired: bool = False) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    start, end = ((now - dt.timedelta(days=3), now - dt.timedelta(days=1)) if expired
                  else (now - dt.timedelta(minutes=5), now + _VALIDITY))
    return (x509.CertificateBuilder()
            .subject_name(_name(hostname))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(_san(hostname), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False))


def self_signed_cert(directory: Path, hostname: str, stem: str | None = None) -> CertFiles:
    """A self-signed server certificate for ``hostname`` (and 127.0.0.1)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf_builder(hostname, key).issuer_name(_name(hostname)).sign(key, hashes.SHA256())
    return _write(directory, stem or hostname, cert, key, chain=())


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
           chain: tuple[x509.Certificate, ...]) -> CertFiles:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain))
    cert_path.write_bytes(pem)
    key_path.write_bytes(_key_pem(key))
    key_path.chmod(0o600)
    return CertFiles(cert_path, key_path)


class LocalCA:
    """A throwaway certificate authority; its PEM is what a policy's ``tafile`` names."""

    def __init__(self, directory: Path, common_name: str = "mailtls test CA") -> None:
        self.directory = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (x509.CertificateBuilder()
                     .subject_name(_name(common_name))
                     .issuer_name(_name(common_name))
                     .public_key(self._key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(minutes=5))
                     .not_valid_after(now + _VALIDITY)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(
                         digital_signature=False, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                         decipher_only=False), critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                         self._key.public_key()), critical=False)
                     .sign(self._key, hashes.SHA256()))
        directory.mkdir(parents=True, exist_ok=True)
        self.pem_path = directory / "ca.pem"
        self.pem_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, hostname: str, directory: Path | None = None,
              stem: str | None = None, *, expired: bool = False) -> CertFiles:
        """A server certificate for ``hostname`` signed by this CA (``expired``: it ended
        yesterday)."""
        key = ec.generate_private_key(ec.SECP256R1())
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key())
        cert = (_leaf_builder(hostname, key, expired)
                .issuer_name(self.cert.subject)
                .add_extension(aki, critical=False)
                .sign(self._key, hashes.SHA256()))
        return _write(directory or self.directory, stem or hostname, cert, key, chain=())


class _Recorder:
    """aiosmtpd handler: keep every message with its session's TLS state."""

    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        cipher = None
        if session.ssl is not None:
            obj = server.transport.get_extra_info("ssl_object") if server.transport else None
            if obj is not None and obj.cipher() is not None:
                cipher = f"{obj.version()} {obj.cipher()[0]}"
        content = envelope.original_content or envelope.content or b""
        self._sink._record(Received(
            mail_from=str(envelope.mail_from),
            rcpt_tos=tuple(str(r) for r in envelope.rcpt_tos),
            data=content if isinstance(content, bytes) else content.encode(),
            tls=session.ssl is not None,
            cipher=cipher,
            smtputf8=bool(envelope.smtp_utf8),
            helo=session.host_name,
        ))
        return "250 2.0.0 Ok: stored by mailtls sink"


class SmtpSink:
    """An SMTP server on 127.0.0.1 that accepts and records everything."""

    def __init__(self, *, name: str, tls_context: ssl.SSLContext | None = None,
                 hostname: str = "sink.mailtls.test", port: int | None = None) -> None:
        self.name = name
        self.hostname = hostname
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.tls = tls_context is not None
        self._messages: list[Received] = []
        self._cond = threading.Condition()
        kwargs: dict[str, Any] = {"enable_SMTPUTF8": True, "server_hostname": hostname,
                                  "decode_data": False}
        if tls_context is not None:
            kwargs.update(tls_context=tls_context, require_starttls=False)
        self._controller = Controller(_Recorder(self), hostname=self.host, port=self.port,
                                      ready_timeout=5.0, **kwargs)
        self._started = False

    @property
    def nexthop(self) -> str:
        """The next-hop (and so the TLS policy key) of a transport entry to this sink."""
        return f"[{self.host}]:{self.port}"

    def _record(self, msg: Received) -> None:
        with self._cond:
            self._messages.append(msg)
            self._cond.notify_all()

    @property
    def messages(self) -> list[Received]:
        with self._cond:
            return list(self._messages)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until ``count`` messages arrived; raise TimeoutError at the deadline."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"sink {self.name}: {len(self._messages)} of "
                                       f"{count} messages after {timeout:.1f}s")
                self._cond.wait(left)
            return list(self._messages)

    def start(self) -> Self:
        self._controller.start()
        self._started = True
        return self

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._controller.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def plain_sink(name: str = "plain") -> SmtpSink:
    """A sink that never offers STARTTLS."""
    return SmtpSink(name=name)


def server_context(files: CertFiles) -> ssl.SSLContext:
    """A server-side TLS context for a sink."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


def starttls_sink(directory: Path, *, name: str = "starttls",
                  hostname: str = "sink.mailtls.test", ca: LocalCA | None = None,
                  expired: bool = False) -> SmtpSink:
    """A sink offering STARTTLS: self-signed, or issued by ``ca`` when given (``expired``:
    a certificate from ``ca`` that ended yesterday)."""
    files = (ca.issue(hostname, directory, stem=name, expired=expired) if ca is not None
             else self_signed_cert(directory, hostname, stem=name))
    return SmtpSink(name=name, tls_context=server_context(files), hostname=hostname)
