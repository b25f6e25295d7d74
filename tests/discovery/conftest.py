"""A loopback DNS + HTTPS world per test (dnslib, trustme), and a Discoverer on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mailtls_operator.discovery.dns import Dns
from mailtls_operator.discovery.engine import Discoverer
from mailtls_operator.discovery.fetch import ssl_context
from testbed.stsworld import StsWorld

GOOD = ["partner.example", "testing.example", "none.example", "big.example",
        "redirect.example", "html.example", "signed.example", "unsigned.example"]


@pytest.fixture
def world() -> Iterator[StsWorld]:
    """``mta-sts.<d>`` certificates for GOOD domains only: any other domain gets the wrong one."""
    with StsWorld([f"mta-sts.{d}" for d in GOOD]) as w:
        yield w


@pytest.fixture
def discoverer(world: StsWorld) -> Discoverer:
    return Discoverer(Dns(("127.0.0.1", world.dns_port), timeout=2.0),
                      ssl_context(world.ca_file), https_port=world.https_port)
