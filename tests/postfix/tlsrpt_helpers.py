"""Shared by the TLSRPT tests: a Postfix 3.10 instance that reports TLSRPT, resolving
through a port-53 loopback DNS server, and the sinks it delivers to."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from testbed import (
    Delivery,
    LocalCA,
    LocalInstance,
    SmtpSink,
    plain_sink,
    postfix_unavailable,
    starttls_sink,
)
from testbed.postfixroot import build_for
from testbed.tlsrptworld import SOCKET_NAME, Port53Dns, reporting_instance
from testbed.tlsrptworld import tlsrpt_record as record

__all__ = ["SOCKET_NAME", "World", "instance", "record", "require_310", "send_all",
           "tlsrpt_world"]

World = tuple[Path, Port53Dns, dict[str, SmtpSink]]


def require_310() -> None:
    reason = postfix_unavailable("3.10")
    if reason is not None:
        pytest.skip(f"TLSRPT is measured on Postfix 3.10 only, which cannot run here: {reason}")


@pytest.fixture(scope="module")
def tlsrpt_world() -> Iterator[World]:
    """A 0755 base directory, the port-53 DNS server and the three kinds of sink."""
    require_310()
    base = Path(tempfile.mkdtemp(prefix="mailtls-tlsrpt-"))
    base.chmod(0o755)
    try:
        dns = Port53Dns().start()
    except OSError as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"a DNS server on port 53 of 127.53.x.y cannot be bound here: {exc}")
    ca = LocalCA(base / "ca")
    sinks = {"plain": plain_sink(),
             "self-signed": starttls_sink(base / "certs", name="self-signed"),
             "ca-signed": starttls_sink(base / "certs", name="ca-signed", ca=ca),
             "expired": starttls_sink(base / "certs", name="expired", ca=ca, expired=True)}
    for sink in sinks.values():
        sink.start()
    (base / "ca.path").write_text(str(ca.pem_path))
    yield base, dns, sinks
    for sink in sinks.values():
        sink.stop()
    dns.stop()
    shutil.rmtree(base, ignore_errors=True)
    build_for("3.10").forget(base)


def instance(base: Path, name: str, dns: Port53Dns, routes: Mapping[str, str],
             policy: Mapping[str, str], **main_cf: str) -> LocalInstance:
    """A created (not started) 3.10 instance reporting TLSRPT, resolving through ``dns``."""
    return reporting_instance(base, name, dns, routes, policy,
                              (base / "ca.path").read_text(), **main_cf)


def send_all(inst: LocalInstance, domains: list[str]) -> dict[str, Delivery]:
    sent = {d: inst.submit(f"user@{d}") for d in domains}
    return {d: inst.wait_for_delivery(q, timeout=30) for d, q in sent.items()}


# (sink, policy table value, publishes a TLSRPT policy) per recipient domain
