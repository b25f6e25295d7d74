"""The pure discovery core: RFC 8461 parsing, MX -> match, refresh plan, DANE, precedence."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from mailtls_operator.discovery.decide import (
    FAIL,
    FETCH,
    KEEP,
    NONE,
    CachedSts,
    DaneAnswer,
    DomainState,
    StsOutcome,
    TxtAnswer,
    dane_decide,
    sts_after,
    sts_plan,
)
from mailtls_operator.discovery.entries import DomainInvalid, domain_keys, entries
from mailtls_operator.discovery.explain import explain
from mailtls_operator.discovery.mtasts import (
    MAX_AGE_CAP,
    StsError,
    StsPolicy,
    StsRecord,
    mx_matches,
    mx_to_match,
    parse_policy,
    parse_txt,
)
from mailtls_operator.policy import load_policy
from mailtls_operator.render import render

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.net\r\nmx: *.example.net\r\n" \
         "max_age: 86400\r\n"


def test_txt_record_parsed_per_rfc8461() -> None:
    assert parse_txt(["v=STSv1; id=20261201T1"]).id == "20261201T1"
    assert parse_txt(["v=STSv1;id=abc;", "unrelated text"]).id == "abc"
    assert parse_txt(["v=STSv1; id=abc; ext_1=x"]).id == "abc"


@pytest.mark.parametrize("records", [
    [],                                            # no record
    ["v=STSv1; id=a", "v=STSv1; id=b"],            # two records: no policy
    ["v=STSv1; id=has-dash"],                      # id is alphanumeric only
    ["v=STSv1; id=" + "a" * 33],                   # at most 32
    ["v=STSv1"],                                   # id required
    ["v=STSv1; id=a; bad field"],                  # malformed extension
    ["v=STSv10; id=a"],                            # not this version
])
def test_txt_records_without_one_valid_policy_mean_no_policy(records: list[str]) -> None:
    with pytest.raises(StsError):
        parse_txt(records)


def test_policy_parsed_with_lf_or_crlf_and_unknown_keys_ignored() -> None:
    policy = parse_policy(POLICY)
    assert policy == StsPolicy("enforce", 86400, ("mx1.example.net", "*.example.net"))
    lf = parse_policy("version: STSv1\nmode: testing\nmx: MX.Example.NET.\nmax_age: 5\n"
                      "future_key: 1\n")
    assert lf == StsPolicy("testing", 5, ("mx.example.net",))
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 1").mx == ()


def test_max_age_is_capped_at_one_year() -> None:
    body = "version: STSv1\nmode: none\nmax_age: 9999999999\n"
    assert parse_policy(body).max_age == MAX_AGE_CAP


@pytest.mark.parametrize("body", [
    "mode: enforce\nmx: a.example\nmax_age: 1",                  # no version
    "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1",  # wrong version
    "version: STSv1\nmode: enforced\nmx: a.example\nmax_age: 1",
    "version: STSv1\nmode: enforce\nmax_age: 1",                 # enforce needs mx
    "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1",
    "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901",
    "version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1",
    "version: STSv1\nmode: enforce\nmx: a b.example\nmax_age: 1",
    "version: STSv1\nmode: enforce\nmx: a.example match=x\nmax_age: 1",
    "<html>not a policy</html>",
])
def test_invalid_policies_refused(body: str) -> None:
    with pytest.raises(StsError):
        parse_policy(body)


def test_mx_patterns_become_postfix_match_names() -> None:
    assert mx_to_match(["mx1.example.net", "*.example.net", "*.example.net"]) == (
        "mx1.example.net", ".example.net")
    # RFC 8461's wildcard is one label; Postfix's ".example.net" is any depth (documented)
    assert mx_matches("*.example.net", "a.example.net")
    assert not mx_matches("*.example.net", "a.b.example.net")
    assert not mx_matches("*.example.net", "example.net")


def _cached(ident: str = "1", at: datetime = NOW, max_age: int = 86400) -> CachedSts:
    return CachedSts(ident, StsPolicy("enforce", max_age, ("mx.example.net",)), at)


def test_refresh_plan() -> None:
    rec = TxtAnswer(record=StsRecord("1"))
    assert sts_plan(None, rec, NOW) == FETCH
    assert sts_plan(_cached(), rec, NOW + timedelta(hours=1)) == KEEP
    assert sts_plan(_cached(), TxtAnswer(record=StsRecord("2")), NOW) == FETCH  # id changed
    # ahead of expiry: the last tenth of max_age (8640 s of a day)
    assert sts_plan(_cached(), rec, NOW + timedelta(seconds=86400 - 8000)) == FETCH
    assert sts_plan(_cached(), rec, NOW + timedelta(days=2)) == FETCH  # expired
    # DNS failure or vanished record: the unexpired cache stays (RFC 8461 §5.1)
    assert sts_plan(_cached(), TxtAnswer(error="timeout"), NOW) == KEEP
    assert sts_plan(_cached(), TxtAnswer(absent="NXDOMAIN"), NOW) == KEEP
    assert sts_plan(None, TxtAnswer(error="timeout"), NOW) == FAIL
    assert sts_plan(_cached(at=NOW - timedelta(days=2)), TxtAnswer(error="x"), NOW) == FAIL
    assert sts_plan(None, TxtAnswer(absent="NXDOMAIN"), NOW) == NONE


def test_failed_fetch_keeps_the_unexpired_cache_and_says_so() -> None:
    rec = TxtAnswer(record=StsRecord("2"))
    out = sts_after(_cached(), rec, FETCH, NOW, fetch_error="redirect refused")
    assert out.cached == _cached() and out.decided
    assert "redirect refused" in out.error and "kept" in out.notes[0]
    gone = sts_after(None, rec, FETCH, NOW, fetch_error="timeout")
    assert gone.cached is None and not gone.decided
    fresh = sts_after(_cached(), rec, FETCH, NOW, fetched=StsPolicy("testing", 60, ("a.b",)))
    assert fresh.cached is not None and fresh.cached.id == "2" and "id changed" in fresh.notes[0]


def test_dane_decision() -> None:
    mx = ("mx1.example.net", "mx2.example.net")
    ok = dane_decide(DaneAnswer(mx, True, {mx[0]: True, mx[1]: True}))
    assert ok.level == "dane-only"
    unsigned = dane_decide(DaneAnswer(mx, True, {mx[0]: False, mx[1]: True}))
    assert unsigned.level is None and "not DNSSEC-validated" in unsigned.reason
    mx_unsigned = dane_decide(DaneAnswer(mx, False, {mx[0]: True, mx[1]: True}))
    assert mx_unsigned.level is None and "MX records" in mx_unsigned.reason
    partial = dane_decide(DaneAnswer(mx, True, {mx[0]: True}))
    assert partial.level is None and "1 of 2" in partial.reason
    assert dane_decide(DaneAnswer(mx, True, {})).level is None
    assert not dane_decide(DaneAnswer(error="SERVFAIL")).decided


def _state(domain: str, dane: bool, mode: str = "enforce") -> DomainState:
    sts = StsOutcome(CachedSts("1", StsPolicy(mode, 86400, ("*.example.net",)), NOW), True)
    return DomainState(domain, ("mta-sts", "dane"),
                       dane=dane_decide(DaneAnswer(("mx.example.net",), True,
                                                   {"mx.example.net": True} if dane else {})),
                       sts=sts)


def _static(name: str, level: str, created: str, exception: bool = False) -> dict[str, object]:
    spec: dict[str, object] = {"destinations": ["partner.example"], "level": level}
    if exception:
        spec["exception"] = {"startsAt": "2026-12-01T00:00:00Z",
                             "expiresAt": "2026-12-05T00:00:00Z", "reason": "cert broke"}
    return {"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy",
            "metadata": {"name": name, "namespace": "mail", "creationTimestamp": created},
            "spec": spec}


def test_precedence_exception_static_dane_mtasts() -> None:
    discovered = entries([_state("partner.example", dane=True)], namespace="mail",
                         name="partners")
    sts_only = entries([_state("partner.example", dane=False)], namespace="mail",
                       name="partners")
    static = load_policy(_static("static", "may", "2026-01-01T00:00:00Z"))
    brk = load_policy(_static("breakglass", "none", "2026-11-01T00:00:00Z", exception=True),
                      now=NOW)

    def line(policies: list) -> tuple[str, str]:  # type: ignore[type-arg]
        t = render(policies, now=NOW)
        return t.tls_entries["partner.example"], t.owners["partner.example"]

    assert line(sts_only) == ("secure match=.example.net servername=hostname",
                              "mail/partners[mta-sts]")
    assert line(discovered) == ("dane-only", "mail/partners[dane]")        # DANE > MTA-STS
    assert line([*discovered, static]) == ("may", "mail/static")          # static > DANE
    assert line([*discovered, static, brk]) == ("none", "mail/breakglass")  # exception wins
    tables = render([*discovered, static], now=NOW)
    assert {loss.winner for loss in tables.losses["mail/partners[dane]"]} == {"mail/static"}
    assert tables.losses["mail/partners[mta-sts]"][0].winner == "mail/static"


def test_testing_mode_is_never_written_and_none_writes_nothing() -> None:
    testing = entries([_state("partner.example", dane=False, mode="testing")])
    assert [p.mode for p in testing] == ["audit"]
    assert "partner.example" not in render(testing, now=NOW).tls_entries
    assert entries([_state("partner.example", dane=False, mode="none")]) == []


def test_idn_domain_gets_both_keys_and_nexthop_forms_are_refused() -> None:
    assert domain_keys("Bücher.Example.") == ("xn--bcher-kva.example", "bücher.example")
    for bad in (".example.com", "[mx.example.com]", "example.com:25", "a b.example"):
        with pytest.raises(DomainInvalid):
            domain_keys(bad)


def test_explain_names_the_object_the_source_and_what_it_beat() -> None:
    discovered = entries([_state("partner.example", dane=True)], namespace="mail",
                         name="partners")
    static = load_policy(_static("static", "may", "2026-01-01T00:00:00Z"))
    line, notes = explain("Partner.Example", [*discovered, static], now=NOW)
    assert line == "partner.example may"
    assert notes[1] == "  from mail/static (source static)"
    assert any("mail/partners[dane]" in n and "explicit policy beats" in n for n in notes)
    assert any("mail/partners[mta-sts]" in n for n in notes)
    line, notes = explain("other.example", [static], now=NOW)
    assert line is None and "no policy" in notes[0]


# ----------------------------------------------------------- hostile partner input

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mailtls_operator.discovery.decide import sts_value  # noqa: E402

_SAFE_VALUE = re.compile(r"secure match=[a-z0-9.-]+(:[a-z0-9.-]+)* servername=hostname")


@given(st.lists(st.one_of(st.text(max_size=40), st.sampled_from(
    ["version: STSv1", "mode: enforce", "max_age: 60", "mx: a.example", "mx: *.b.example",
     "mx: a.example\nmatch=x", "mx: a\u00e9.example", "mx: a.example:25"])), max_size=8))
def test_no_policy_body_can_put_anything_but_host_names_into_a_line(lines: list[str]) -> None:
    """A partner's policy is untrusted input: it yields a safe line or is refused."""
    try:
        policy = parse_policy("\r\n".join(lines))
    except StsError:
        return
    if policy.mode != "none":
        assert _SAFE_VALUE.fullmatch(sts_value(policy)), sts_value(policy)


@given(st.lists(st.text(max_size=60), max_size=3))
def test_txt_parsing_never_fails_but_with_sts_error(records: list[str]) -> None:
    try:
        record = parse_txt(records)
    except StsError:
        return
    assert re.fullmatch(r"[A-Za-z0-9]{1,32}", record.id)
