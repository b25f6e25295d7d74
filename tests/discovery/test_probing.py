"""Testing-mode MTA-STS, probed with the real posttls-finger: would enforcing pass?"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailtls_operator import probe
from mailtls_operator.cli.probe import LOCAL, HostRunner
from mailtls_operator.discovery.dns import Dns
from mailtls_operator.discovery.engine import Discoverer
from mailtls_operator.discovery.fetch import ssl_context
from mailtls_operator.discovery.probing import Verdict, probe_testing
from testbed import LocalCA, SmtpSink, postfix_unavailable, starttls_sink
from testbed.stsworld import StsWorld

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def sinks(tmp_path: Path) -> Iterator[tuple[LocalCA, SmtpSink, SmtpSink]]:
    if (reason := postfix_unavailable()) is not None:
        pytest.skip(reason)
    ca = LocalCA(tmp_path / "ca")
    good = starttls_sink(tmp_path / "certs", name="good", hostname="mx.good.example",
                         ca=ca).start()
    wrong = starttls_sink(tmp_path / "certs", name="wrong", hostname="elsewhere.example",
                          ca=ca).start()
    yield ca, good, wrong
    good.stop()
    wrong.stop()


async def test_testing_domains_would_pass_or_fail(
        sinks: tuple[LocalCA, SmtpSink, SmtpSink], tmp_path: Path) -> None:
    ca, good, wrong = sinks
    config = tmp_path / "postfix"
    config.mkdir()
    (config / "main.cf").write_text(f"smtp_tls_CAfile = {ca.pem_path}\n")
    runner = HostRunner(str(config))
    defaults = await probe.read_client_defaults(runner, LOCAL)
    names = ["mta-sts.good.example", "mta-sts.wrong.example", "mta-sts.nomx.example",
             "mta-sts.enforced.example"]
    with StsWorld(names) as world:
        for domain in ("good.example", "wrong.example"):
            world.publish_sts(domain, id="1", mode="testing", mx=[f"*.{domain}"])
            world.publish_mx(domain, f"mx.{domain}")
        world.publish_sts("nomx.example", id="1", mode="testing", mx=["*.nomx.example"])
        world.publish_mx("nomx.example", "mx.elsewhere.example")
        world.publish_sts("enforced.example", id="1")
        discoverer = Discoverer(Dns(("127.0.0.1", world.dns_port), timeout=2.0),
                                ssl_context(world.ca_file), https_port=world.https_port)
        states = {s.domain: s for s in await discoverer.discover_all(
            ["good.example", "wrong.example", "nomx.example", "enforced.example"], NOW,
            ["mta-sts"])}

        async def verdict(domain: str, port: int) -> Verdict | None:
            return await probe_testing(discoverer, states[domain], runner, LOCAL, defaults,
                                       port=port)

        passed = await verdict("good.example", good.port)
        failed = await verdict("wrong.example", wrong.port)
        nomx = await verdict("nomx.example", wrong.port)
        assert await verdict("enforced.example", good.port) is None  # only testing mode
    assert passed is not None and passed.passed, passed
    assert "Pass" in passed.details[0]
    assert failed is not None and not failed.passed
    assert "NameMismatch" in failed.details[0]
    assert failed.line().startswith("wrong.example: mta-sts testing: would fail if enforced")
    assert nomx is not None and not nomx.passed
    assert "matches the policy's mx patterns" in nomx.details[0]
