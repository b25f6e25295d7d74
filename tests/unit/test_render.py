"""The renderer: deterministic, sorted, provenance, conflicts resolved as DESIGN.md §4 says."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mailtls_operator.policy import Policy, PolicyInvalid, load_policy
from mailtls_operator.render import REVISION_KEY, render

from .strategies import specs
from .test_policy import obj

NOW = datetime(2026, 11, 25, tzinfo=UTC)


def pol(name: str, level: str, dests: list[str], created: str = "2026-01-01T00:00:00Z",
        namespace: str = "mail", **extra: Any) -> Policy:
    return load_policy(obj({"destinations": dests, "level": level, **extra}, name=name,
                           namespace=namespace, created=created), now=NOW)


def entry_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln and not ln.startswith("#")]


def test_table_is_sorted_with_provenance_and_revision() -> None:
    tables = render([pol("b", "encrypt", ["z.example", "a.example"]), pol("a", "may", ["m.ex"])],
                    instance=("mail", "relay"))
    lines = tables.tls_policy.splitlines()
    assert lines[1] == "# instance: mail/relay"
    assert lines[2] == f"# revision: {tables.revision}"
    assert entry_lines(tables.tls_policy) == [
        f"{REVISION_KEY} secure match=rev-{tables.revision[:16]}",
        "a.example encrypt", "m.ex may", "z.example encrypt"]
    assert "# mail/b\na.example encrypt\n# mail/a\nm.ex may\n# mail/b\nz.example encrypt\n" \
        in tables.tls_policy
    assert tables.transport == ""


def _match(i: int) -> dict[str, Any]:
    return {"match": ["nexthop"]} if i % 3 == 2 else {}


def test_identical_input_in_any_order_gives_identical_bytes() -> None:
    policies = [pol(f"p{i}", ["may", "encrypt", "secure"][i % 3], [f"d{i % 7}.example"],
                    created=f"2026-01-{1 + i % 28:02d}T00:00:00Z",
                    **_match(i)) for i in range(40)]
    first = render(policies, instance=("mail", "relay"))
    for seed in range(5):
        shuffled = policies[:]
        random.Random(seed).shuffle(shuffled)
        again = render(shuffled, instance=("mail", "relay"))
        assert again.tls_policy == first.tls_policy
        assert again.losses == first.losses


def test_stricter_level_wins_and_loser_is_told() -> None:
    old_may = pol("old-may", "may", ["a.example"], created="2025-01-01T00:00:00Z")
    new_enc = pol("new-encrypt", "encrypt", ["a.example"], created="2026-01-01T00:00:00Z")
    tables = render([old_may, new_enc])
    assert tables.tls_entries["a.example"] == "encrypt"
    assert tables.owners["a.example"] == "mail/new-encrypt"
    [loss] = tables.losses["mail/old-may"]
    assert (loss.key, loss.winner, loss.reason) == ("a.example", "mail/new-encrypt", "Conflict")


def test_encrypt_and_dane_are_not_comparable_so_the_oldest_wins() -> None:
    dane = pol("dane", "dane", ["a.example"], created="2025-06-01T00:00:00Z")
    enc = pol("enc", "encrypt", ["a.example"], created="2025-01-01T00:00:00Z")
    assert render([dane, enc]).tls_entries["a.example"] == "encrypt"
    assert render([dane, enc]).losses["mail/dane"][0].winner == "mail/enc"


def test_same_rank_different_settings_oldest_wins_then_name() -> None:
    a = pol("a", "secure", ["k.example"], match=["nexthop"])
    b = pol("b", "secure", ["k.example"], match=["hostname"])
    tables = render([b, a])
    assert tables.tls_entries["k.example"] == "secure match=nexthop"
    assert tables.losses["mail/b"][0].winner == "mail/a"


def test_agreeing_policies_are_not_in_conflict() -> None:
    tables = render([pol("a", "encrypt", ["k.example"]), pol("b", "encrypt", ["k.example"])])
    assert tables.losses == {}
    assert tables.contributors["mail/b"] == ["k.example encrypt"]


def test_exception_beats_stronger_policy_and_expires() -> None:
    secure = pol("secure", "secure", ["p.example"], match=["nexthop"])
    brk = pol("break-glass", "may", ["p.example"],
              exception={"startsAt": "2026-11-20T00:00:00Z",
                         "expiresAt": "2026-12-01T00:00:00Z", "reason": "INC-1 cert broke"})
    during = render([secure, brk], now=NOW)
    assert during.tls_entries["p.example"] == "may"
    assert during.losses["mail/secure"][0].reason == "Overridden"
    after = render([secure, brk], now=datetime(2026, 12, 1, tzinfo=UTC))
    assert after.tls_entries["p.example"] == "secure match=nexthop"


def test_between_exceptions_the_first_to_expire_wins() -> None:
    late = pol("late", "may", ["p.example"], created="2025-01-01T00:00:00Z",
               exception={"startsAt": "2026-11-20T00:00:00Z",
                                      "expiresAt": "2026-12-10T00:00:00Z", "reason": "INC-2"})
    soon = pol("soon", "none", ["p.example"],
               exception={"startsAt": "2026-11-20T00:00:00Z",
                                      "expiresAt": "2026-12-01T00:00:00Z", "reason": "INC-3"})
    tables = render([late, soon], now=NOW)
    assert tables.tls_entries["p.example"] == "none"
    assert tables.losses["mail/late"][0].reason == "Conflict"


def test_instance_gets_only_its_namespace_and_targeting_policies() -> None:
    policies = [pol("all", "may", ["a.example"]),
                pol("relay-only", "encrypt", ["b.example"], instances=["relay"]),
                pol("edge-only", "encrypt", ["c.example"], instances=["edge"]),
                pol("other-ns", "encrypt", ["a.example"], namespace="other")]
    tables = render(policies, instance=("mail", "relay"))
    assert set(tables.tls_entries) == {REVISION_KEY, "a.example", "b.example"}
    assert tables.tls_entries["a.example"] == "may"


def test_audit_policies_write_nothing() -> None:
    tables = render([pol("audit", "secure", ["a.example"], match=["nexthop"], mode="audit")])
    assert set(tables.tls_entries) == {REVISION_KEY}


def test_route_direct_writes_transport_for_both_idn_forms() -> None:
    tables = render([pol("r", "encrypt", ["bücher.example", "plain.example"], route="direct")])
    assert tables.transport_entries == {
        "bücher.example": "smtp:xn--bcher-kva.example",
        "plain.example": "smtp:plain.example",
        "xn--bcher-kva.example": "smtp:xn--bcher-kva.example"}
    assert "plain.example smtp:plain.example\n" in tables.transport


def test_revision_changes_exactly_when_content_changes() -> None:
    a = render([pol("a", "may", ["a.example"])]).revision
    assert render([pol("a", "may", ["a.example"])]).revision == a
    assert render([pol("a", "encrypt", ["a.example"])]).revision != a
    assert render([pol("b", "may", ["a.example"])]).revision != a  # provenance is content


ALLOWED_ATTRS = {"match", "ciphers", "protocols", "exclude", "tafile", "servername",
                 "connection_reuse"}


@settings(max_examples=600, deadline=None)
@given(st.lists(specs(), min_size=1, max_size=4))
def test_no_input_adds_a_line_a_key_or_an_attribute(spec_list: list[dict[str, Any]]) -> None:
    accepted = []
    for i, spec in enumerate(spec_list):
        try:
            accepted.append(load_policy(obj(spec, name=f"p{i}"), now=NOW))
        except PolicyInvalid:
            continue
    tables = render(accepted, now=NOW)
    declared_keys = {k for p in accepted if p.mode != "audit" for k in p.keys}
    lines = entry_lines(tables.tls_policy)
    assert len(lines) == len(declared_keys) + 1  # + the revision line
    for line in lines:
        assert line.isprintable() and "\t" not in line
        key, *tokens = line.split(" ")
        assert key == REVISION_KEY or key in declared_keys
        assert tokens[0] in {"none", "may", "encrypt", "dane", "dane-only", "fingerprint",
                             "verify", "secure"}
        for token in tokens[1:]:
            name, _, value = token.partition("=")
            assert name in ALLOWED_ATTRS and value and "," not in value and "#" not in value
            # Postfix splits name=value at the first "="; only protocols (">=TLSv1.2") has more
            assert "=" not in value or (name == "protocols" and
                                        re.fullmatch(r"([<>]=|!)?TLSv1(\.[0-3])?(:.*)?", value))
        if key != REVISION_KEY:
            owner = next(p for p in accepted if p.ref == tables.owners[key])
            assert " ".join(tokens) == owner.value
    for line in tables.tls_policy.splitlines():
        assert line == "" or line.startswith("#") or not line[0].isspace()
