"""Version lint: a line the instance's Postfix cannot parse is held back, the rest rolls out.

Pure checks of the attribute table, then the whole operator against a real
Postfix pod whose ``postconf`` reports ``mail_version = 3.3.0`` (set in its
main.cf: postconf answers the configured value, as an older Postfix would
answer its own), so ``servername`` (Postfix 3.4) must be held back with
``UnsupportedAttribute`` while an ordinary line is rolled out.
"""

from __future__ import annotations

import pytest

from mailtls_operator.facts import InstanceFacts
from mailtls_operator.versionlint import VersionLint
from mailtls_operator.versions import DEPRECATED_REASON, held_back, parse_version, unsupported
from testbed import LocalPodRunner

from .conftest import PodFactory
from .helpers import policy
from .operating import Kubectl, operator, seed_pods


def test_attribute_minimum_versions() -> None:
    assert parse_version("3.7.11") == (3, 7, 11)
    assert parse_version("3.10-20250117") == (3, 10)
    assert parse_version("unknown") is None
    assert unsupported("secure match=.example.net servername=hostname", (3, 3, 0)) == [
        "servername needs Postfix 3.4"]
    assert unsupported("secure match=.example.net servername=hostname", (3, 4)) == []
    assert unsupported("encrypt connection_reuse=yes protocols=>=TLSv1.2", (3, 4, 0)) == [
        "protocols=>=TLSv1.2 (range syntax) needs Postfix 3.6"]
    assert unsupported("dane-only", (2, 10)) == ["level dane-only needs Postfix 2.11"]
    assert unsupported("secure policy_type=sts", (3, 9)) == ["policy_type needs Postfix 3.10"]
    old = policy("sni", "encrypt", ["a.example"], servername="hostname")
    fine = policy("plain", "encrypt", ["b.example"])
    assert set(held_back([old, fine], "3.3.0", "relay")) == {"mail/sni"}
    assert held_back([old, fine], "", "relay") == {}  # unreadable: hold nothing


@pytest.mark.postfix
@pytest.mark.cluster
async def test_unsupported_attribute_held_back_from_old_postfix(
        make_pod: PodFactory, runner: LocalPodRunner, kubectl: Kubectl) -> None:
    [(_, inst)] = await seed_pods(make_pod, kubectl, 1, extra_main_cf={"mail_version": "3.3.0"})
    async with operator(kubectl, runner):
        await kubectl.apply("sni", destinations=["sni.example"], level="encrypt",
                            servername="hostname")
        await kubectl.apply("fine", destinations=["fine.example"], level="encrypt")
        held = await kubectl.until_ready("sni", reason="UnsupportedAttribute")
        assert "servername needs Postfix 3.4" in held["message"]
        assert "runs 3.3.0" in held["message"]
        await kubectl.until_ready("fine")
        assert inst.query("fine.example") == "encrypt"
        assert inst.query("sni.example") is None


async def test_agent_mode_lints_from_the_reported_facts_without_exec() -> None:
    runner = LocalPodRunner()  # no pod: any exec would fail
    reported = InstanceFacts({"mail_version": "3.7.11", "smtp_use_tls": "yes",
                              "smtp_enforce_tls": "no", "smtp_tls_per_site": ""})
    rpk = policy("rpk", "encrypt", ["rpk.example"], enableRPK=True)
    fine = policy("plain", "encrypt", ["b.example"])
    warnings: dict[str, list[tuple[str, str]]] = {}
    held = await VersionLint().hold(runner, ("mail", "relay"), None, [rpk, fine], warnings,
                                    reported)
    assert set(held) == {"mail/rpk"}
    assert "enable_rpk needs Postfix 3.9" in held["mail/rpk"]
    assert runner.calls == []
    deprecated = [m for r, m in warnings["mail/plain"] if r == DEPRECATED_REASON]
    assert deprecated == ["main.cf sets smtp_use_tls = yes: Postfix 3.10 warns "
                          "that support for it will be removed; specify "
                          "smtp_tls_security_level instead"]
    assert await VersionLint().hold(runner, ("mail", "relay"), None, [rpk], {}, None) == {}
