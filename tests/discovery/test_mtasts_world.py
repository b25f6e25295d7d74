"""MTA-STS against a loopback DNS server and HTTPS server: what is written, cached, refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mailtls_operator.cli.discover import table_lines
from mailtls_operator.discovery.decide import DomainState
from mailtls_operator.discovery.engine import Discoverer
from mailtls_operator.discovery.report import domain_status
from testbed.stsworld import Page, StsWorld

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
D = "partner.example"


async def _one(discoverer: Discoverer, domain: str = D, at: datetime = NOW) -> DomainState:
    return await discoverer.discover(domain, at, ["mta-sts"])


async def test_enforce_becomes_a_secure_line(world: StsWorld, discoverer: Discoverer) -> None:
    world.publish_sts(D, id="20261201", mx=["mx1.partner.example", "*.mail.partner.example"])
    state = await _one(discoverer)
    assert table_lines([state], NOW) == [
        "partner.example secure match=mx1.partner.example:.mail.partner.example "
        "servername=hostname"]
    status = domain_status(state)
    assert (status["source"], status["mode"], status["id"]) == ("mta-sts", "enforce", "20261201")
    assert status["mx"] == ["mx1.partner.example", "*.mail.partner.example"]
    assert status["expiresAt"] == "2026-12-02T12:00:00Z" and status["lastError"] == ""


async def test_testing_and_none_write_nothing(world: StsWorld, discoverer: Discoverer) -> None:
    world.publish_sts("testing.example", id="1", mode="testing")
    world.publish_sts("none.example", id="1", mode="none")
    testing = await _one(discoverer, "testing.example")
    none = await _one(discoverer, "none.example")
    assert table_lines([testing, none], NOW) == []
    assert domain_status(testing)["wouldEnforce"].startswith("secure match=mx.testing.example")
    assert domain_status(none)["mode"] == "none" and "entry" not in domain_status(none)
    assert testing.decided and none.decided


async def test_no_record_means_no_policy(world: StsWorld, discoverer: Discoverer) -> None:
    state = await _one(discoverer, "nothing.example")
    assert state.decided and table_lines([state], NOW) == []
    assert "NXDOMAIN" in state.sts.notes[0]  # type: ignore[union-attr]


async def test_id_change_refetches_and_same_id_does_not(world: StsWorld,
                                                       discoverer: Discoverer) -> None:
    world.publish_sts(D, id="1", mx=["mx1.partner.example"])
    await _one(discoverer)
    world.publish_sts(D, id="1", mx=["mx2.partner.example"])  # body changed, id did not
    same = await _one(discoverer, at=NOW + timedelta(hours=1))
    assert discoverer.fetches == 1
    assert table_lines([same], NOW)[0].startswith("partner.example secure match=mx1.")
    world.publish_sts(D, id="2", mx=["mx2.partner.example"])
    changed = await _one(discoverer, at=NOW + timedelta(hours=2))
    assert discoverer.fetches == 2
    assert table_lines([changed], NOW)[0].startswith("partner.example secure match=mx2.")
    assert "id changed" in changed.sts.notes[0]  # type: ignore[union-attr]


async def test_max_age_expiry_refetches(world: StsWorld, discoverer: Discoverer) -> None:
    world.publish_sts(D, id="1", max_age=3600)
    await _one(discoverer)
    await _one(discoverer, at=NOW + timedelta(minutes=30))
    assert discoverer.fetches == 1
    late = await _one(discoverer, at=NOW + timedelta(hours=2))
    assert discoverer.fetches == 2 and "expired" in late.sts.notes[0]  # type: ignore[union-attr]


async def test_failed_refresh_keeps_the_cached_policy(world: StsWorld,
                                                      discoverer: Discoverer) -> None:
    world.publish_sts(D, id="1")
    await _one(discoverer)
    world.publish_sts(D, id="2")
    world.page(D).status = 500
    kept = await _one(discoverer, at=NOW + timedelta(hours=1))
    assert table_lines([kept], NOW) == [
        "partner.example secure match=mx.partner.example servername=hostname"]
    status = domain_status(kept)
    assert status["id"] == "1" and "HTTP 500" in status["lastError"]
    assert any("kept until" in r for r in status["reasons"])
    world.zone.servfail.add(f"_mta-sts.{D}")  # DNS fails too: still kept, still said
    dns_down = await _one(discoverer, at=NOW + timedelta(hours=2))
    assert table_lines([dns_down], NOW) != [] and "TXT lookup failed" in dns_down.sts.error  # type: ignore[union-attr]
    expired = await _one(discoverer, at=NOW + timedelta(days=2))
    assert not expired.decided and table_lines([expired], NOW) == []


async def test_redirect_refused(world: StsWorld, discoverer: Discoverer) -> None:
    world.publish_sts("redirect.example", id="1")
    world.https.pages["mta-sts.redirect.example"] = Page(
        status=301, location="https://mta-sts.partner.example/.well-known/mta-sts.txt")
    state = await _one(discoverer, "redirect.example")
    assert not state.decided and "redirect" in state.sts.error  # type: ignore[union-attr]
    assert table_lines([state], NOW) == []


async def test_wrong_certificate_refused(world: StsWorld, discoverer: Discoverer) -> None:
    world.publish_sts("wrongcert.example", id="1")  # not among the certificate's names
    state = await _one(discoverer, "wrongcert.example")
    assert not state.decided and "certificate" in state.sts.error  # type: ignore[union-attr]


async def test_untrusted_ca_refused(world: StsWorld) -> None:
    from mailtls_operator.discovery.dns import Dns
    from mailtls_operator.discovery.fetch import ssl_context

    world.publish_sts(D, id="1")
    system_ca = Discoverer(Dns(("127.0.0.1", world.dns_port), timeout=2.0), ssl_context(None),
                           https_port=world.https_port)
    state = await system_ca.discover(D, NOW, ["mta-sts"])
    assert "certificate" in state.sts.error  # type: ignore[union-attr]


async def test_oversized_and_non_text_policies_refused(world: StsWorld,
                                                       discoverer: Discoverer) -> None:
    world.publish_sts("big.example", id="1")
    page = world.page("big.example")
    page.body = page.body + b"x-padding: " + b"a" * 70_000 + b"\r\n"
    big = await _one(discoverer, "big.example")
    assert "limit" in big.sts.error  # type: ignore[union-attr]
    world.publish_sts("html.example", id="1")
    world.page("html.example").content_type = "text/html"
    html = await _one(discoverer, "html.example")
    assert "text/plain" in html.sts.error  # type: ignore[union-attr]
    assert table_lines([big, html], NOW) == []


async def test_dane_with_ad_wins_and_without_ad_writes_nothing(
        world: StsWorld, discoverer: Discoverer) -> None:
    for domain, signed in (("signed.example", True), ("unsigned.example", False)):
        world.publish_sts(domain, id="1")
        world.publish_mx(domain, f"mx.{domain}", tlsa=True, signed=signed)
    states = await discoverer.discover_all(["signed.example", "unsigned.example"], NOW)
    assert table_lines(states, NOW) == [
        "signed.example dane-only",
        "unsigned.example secure match=mx.unsigned.example servername=hostname"]
    signed_status, unsigned_status = (domain_status(s) for s in states)
    assert signed_status["source"] == "dane" and signed_status["mode"] == "dane-only"
    assert unsigned_status["source"] == "mta-sts"
    assert any("not DNSSEC-validated" in r for r in unsigned_status["reasons"])
    dane_only = await discoverer.discover("unsigned.example", NOW, ["dane"])
    assert table_lines([dane_only], NOW) == [] and dane_only.decided
