"""Keys as Postfix looks them up (docs/keys.md): its case folding, IDN full stops, and
characters IDNA mapping deletes.  The folding facts here were measured on Postfix 3.7.11
(tests/postfix/test_key_folding.py checks them against the real postmap)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailtls_operator.discovery.explain import explain
from mailtls_operator.keys import also_governs, lookup_key
from mailtls_operator.policy import Policy, PolicyInvalid, load_policy, normalise_destination
from mailtls_operator.render import render
from mailtls_operator.routing import InstanceConfig, governing_key, lint
from mailtls_operator.status import KEY_FOLDING, InstanceView, conditions_for
from mailtls_operator.world import PolicyRecord

from .test_policy import obj
from .test_render import NOW, entry_lines, pol

# (a, b, one key with smtputf8_enable = yes, one key with = no): measured with postmap
MEASURED = [
    ("stra\u00dfe.example", "strasse.example", True, False),
    ("\u03c3\u03c2.example", "\u03c3\u03c3.example", True, False),
    ("STRASSE.example", "strasse.example", True, True),
    ("STRA\u00dfE.example", "stra\u00dfe.example", True, True),
    ("\u00c9COLE.example", "\u00e9cole.example", True, False),
    ("\u00e9.example", "e\u0301.example", False, False),  # no NFC
    ("\u0131.example", "i.example", False, False),  # dotless i: no Turkic folding
    ("\u0130.example", "i\u0307.example", True, False),
    ("\u0130.example", "i.example", False, False),
    ("\u13a0.example", "\uab70.example", True, False),  # Cherokee folds to upper case
    ("\ufb03.example", "ffi.example", True, False),
    ("\u1e9e.example", "ss.example", True, False),
    ("\u017f.example", "s.example", True, False),
    ("\u212a.example", "k.example", True, False),  # Kelvin sign
    ("\uff21.example", "\uff41.example", True, False),  # fullwidth: case only
    ("\uff41.example", "a.example", False, False),  # ... no compatibility mapping
    ("\u03ac.example", "\u1f71.example", False, False),  # tonos vs oxia: no normalisation
    ("\u1fbc.example", "\u03b1\u03b9.example", True, False),
    ("\U00010400.example", "\U00010428.example", True, False),
]


@pytest.mark.parametrize(("a", "b", "yes", "no"), MEASURED)
def test_lookup_key_folds_as_the_measured_postfix(a: str, b: str, yes: bool, no: bool) -> None:
    assert (lookup_key(a, smtputf8=True) == lookup_key(b, smtputf8=True)) is yes
    assert (lookup_key(a, smtputf8=False) == lookup_key(b, smtputf8=False)) is no


def test_without_smtputf8_only_ascii_letters_are_lowered() -> None:
    assert lookup_key("STRA\u00dfE.Example", smtputf8=False) == "stra\u00dfe.example"
    assert lookup_key("\u00c9COLE.example", smtputf8=False) == "\u00c9cole.example"


def test_model_keys_are_their_own_lookup_key_without_smtputf8() -> None:
    """With ``smtputf8_enable = no`` every key the model writes is looked up as written."""
    for raw in ("Stra\u00dfe.Example", "\u03a3\u03c2.example", "B\u00dcCHER.example."):
        keys, errors = normalise_destination(raw, "d")
        assert errors == []
        assert all(lookup_key(k, smtputf8=False) == k for k in keys)


@pytest.mark.parametrize(("key", "other"), [
    ("stra\u00dfe.example", "strasse.example"),
    (".stra\u00dfe.example", ".strasse.example"),
    ("[stra\u00dfe.example]:25", "[strasse.example]:25"),
    ("\u03c3\u03c2.example", "xn--4xaa.example"),
])
def test_a_ulabel_key_that_folds_to_another_domain_is_named(key: str, other: str) -> None:
    assert also_governs(key) == other
    assert also_governs(key, smtputf8=False) is None


@pytest.mark.parametrize("key", ["b\u00fccher.example", "strasse.example",
                                 "xn--strae-oqa.example", "\u01f0.example"])
def test_a_key_that_folds_to_the_same_domain_names_nothing(key: str) -> None:
    assert also_governs(key) is None


@pytest.mark.parametrize(("raw", "keys"), [
    ("\u4e2d\u56fd\u3002", ["xn--fiqs8s", "\u4e2d\u56fd"]),
    ("\u4e2d\u56fd\uff0e", ["xn--fiqs8s", "\u4e2d\u56fd"]),
    ("example.com\uff61", ["example.com"]),
    ("mx\u3002example\uff0ecom", ["mx.example.com"]),
    ("\u3002example.com", [".example.com"]),
    ("[mx\uff0eexample\u3002]:25", ["[mx.example]:25"]),
])
def test_idn_full_stops_separate_labels_and_a_trailing_one_goes(raw: str,
                                                                keys: list[str]) -> None:
    assert normalise_destination(raw, "d") == (keys, [])


@pytest.mark.parametrize("raw", ["\u4e2d\u56fd\u3002\u3002", "a\u3002\u3002b", "\u3002",
                                 "\u00fc..x", ".\u3002example"])
def test_an_empty_label_is_refused(raw: str) -> None:
    keys, errors = normalise_destination(raw, "spec.destinations[0]")
    assert keys == []
    assert errors and errors[0].field == "spec.destinations[0]"


STOPS = st.sampled_from([".", "\u3002", "\uff0e", "\uff61"])
LABELS = st.sampled_from(["a", "mx", "b\u00fccher", "stra\u00dfe", "\u4e2d\u56fd", "xn--fiqs8s",
                          "\u03c3\u03c2", "", "EXAMPLE", "-x"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(LABELS, STOPS), min_size=1, max_size=5),
       st.sampled_from(["", ".", "["]), st.sampled_from(["", ":25"]))
def test_no_accepted_destination_yields_a_trailing_dot_or_an_empty_label(
        parts: list[tuple[str, str]], prefix: str, port: str) -> None:
    name = "".join(label + stop for label, stop in parts)
    raw = f"[{name}]{port}" if prefix == "[" else f"{prefix}{name}{port}"
    keys, errors = normalise_destination(raw, "d")
    for key in keys:
        host = key.lstrip(".[").split("]")[0].split(":")[0]
        assert not host.endswith(".")
        assert "" not in host.split(".")
    assert bool(keys) != bool(errors)


@pytest.mark.parametrize("char", ["\u3164", "\u115f", "\u1160", "\uffa0", "\u034f",
                                  "\ufe0f", "\u180b", "\U000e0100"])
def test_a_character_idna_mapping_deletes_is_refused_with_the_field(char: str) -> None:
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(obj({"destinations": ["ok.example", f"bank.example{char}x"],
                         "level": "encrypt"}))
    (error,) = caught.value.errors
    assert error.field == "spec.destinations[1]"
    assert f"U+{ord(char):04X}" in error.message
    assert "IDNA mapping deletes" in error.message


def test_a_destination_folding_onto_another_in_the_same_policy_is_a_duplicate() -> None:
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(obj({"destinations": ["strasse.example", "STRA\u00dfE.example"],
                         "level": "encrypt"}))
    (error,) = caught.value.errors
    assert error.field == "spec.destinations[1]"
    assert "Duplicate value" in error.message and "strasse.example" in error.message


def _issue_policies() -> list[Policy]:
    return [pol("plain", "none", ["strasse.example"], created="2026-01-01T00:00:00Z"),
            pol("sharp", "secure", ["stra\u00dfe.example"], created="2026-01-02T00:00:00Z",
                match=["nexthop"])]


def test_folded_keys_conflict_and_the_stricter_policy_wins() -> None:
    tables = render(_issue_policies(), now=NOW)
    lines = entry_lines(tables.tls_policy)[1:]
    assert lines == ["stra\u00dfe.example secure match=nexthop",
                     "xn--strae-oqa.example secure match=nexthop"]
    (loss,) = tables.losses["mail/plain"]
    assert (loss.key, loss.winner, loss.reason) == ("strasse.example", "mail/sharp", "Conflict")
    assert loss.folded_with == "stra\u00dfe.example"
    assert "mail/plain" not in tables.contributors


def test_the_stricter_policy_wins_in_either_order_and_age() -> None:
    plain, sharp = _issue_policies()
    older_sharp = pol("sharp", "secure", ["stra\u00dfe.example"], match=["nexthop"],
                      created="2025-01-01T00:00:00Z")
    for policies in ([sharp, plain], [plain, older_sharp], [older_sharp, plain]):
        tables = render(policies, now=NOW)
        assert tables.tls_entries.get("stra\u00dfe.example") == "secure match=nexthop"
        assert "strasse.example" not in tables.tls_entries
        assert [lo.winner for lo in tables.losses["mail/plain"]] == ["mail/sharp"]


def test_without_smtputf8_the_two_keys_are_distinct() -> None:
    tables = render(_issue_policies(), now=NOW, smtputf8=False)
    assert tables.tls_entries["strasse.example"] == "none"
    assert tables.tls_entries["stra\u00dfe.example"] == "secure match=nexthop"
    assert tables.losses == {}


def test_agreeing_policies_share_a_folded_key_without_a_loss() -> None:
    tables = render([pol("a", "encrypt", ["strasse.example"]),
                     pol("b", "encrypt", ["stra\u00dfe.example"])], now=NOW)
    assert tables.losses == {}
    folded = [k for k in tables.tls_entries if lookup_key(k, smtputf8=True) == "strasse.example"]
    assert len(folded) == 1


GATE_NAMES = st.sampled_from(["strasse.example", "stra\u00dfe.example", "STRA\u1e9eE.example",
                              "\u03c3\u03c3.example", "\u03c3\u03c2.example",
                              "\u03a3\u03a3.example", "b\u00fccher.example", "\ufb03.example",
                              "ffi.example", "\u0130.example"])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(GATE_NAMES, st.sampled_from(["none", "may", "encrypt", "secure"])),
                min_size=1, max_size=6))
def test_no_two_written_lines_fold_to_one_key(drawn: list[tuple[str, str]]) -> None:
    policies = []
    for i, (name, level) in enumerate(drawn):
        try:
            policies.append(pol(f"p{i}", level, [name], created=f"2026-01-0{1 + i}T00:00:00Z"))
        except PolicyInvalid:
            continue
    for smtputf8 in (True, False):
        tables = render(policies, now=NOW, smtputf8=smtputf8)
        written = [ln.split(" ", 1)[0] for ln in entry_lines(tables.tls_policy)]
        folded = [lookup_key(k, smtputf8=smtputf8) for k in written]
        assert len(set(folded)) == len(folded)
        for p in policies:  # every key a policy declared is written, agreed with or lost
            lost = {lo.key for lo in tables.losses.get(p.ref, [])}
            mine = set(tables.contributors.keys_of(p.ref))
            assert set(p.keys) == lost | mine


def test_the_operator_lint_warns_where_a_ulabel_key_answers_for_another_domain() -> None:
    lines = {"mail/sharp": ["xn--strae-oqa.example secure", "stra\u00dfe.example secure"],
             "mail/plain": ["b\u00fccher.example encrypt"]}
    found = lint(lines, [], InstanceConfig.from_postconf({"smtputf8_enable": "yes"}))
    ((reason, message),) = found["mail/sharp"]
    assert reason == KEY_FOLDING
    assert "stra\u00dfe.example also answers for strasse.example" in message
    assert "mail/plain" not in found
    assert lint(lines, [], InstanceConfig.from_postconf({"smtputf8_enable": "no"})) == {}


def test_an_instance_is_taken_to_fold_unless_it_says_no() -> None:
    assert InstanceConfig().smtputf8
    assert InstanceConfig.from_postconf({"smtputf8_enable": "yes"}).smtputf8
    assert not InstanceConfig.from_postconf({"smtputf8_enable": "no"}).smtputf8


def test_validate_warns_on_stderr_and_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("apiVersion: mailtls.io/v1alpha1\nkind: MailTLSPolicy\n"
                    "metadata: {name: sharp, namespace: mail}\n"
                    "spec: {destinations: [stra\u00dfe.example], level: encrypt}\n",
                    encoding="utf-8")
    mailtls = str(Path(sys.executable).with_name("mailtls"))
    out = subprocess.run([mailtls, "validate", "-f", str(path)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    warning = [ln for ln in out.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1
    assert "mail/sharp" in warning[0] and "also answers for strasse.example" in warning[0]


def test_the_governing_key_is_found_as_postfix_folds_the_next_hop() -> None:
    keys = {"stra\u00dfe.example", ".\u03c3\u03c3.example", "plain.example"}
    folding = InstanceConfig.from_postconf({"smtputf8_enable": "yes"})
    exact = InstanceConfig.from_postconf({"smtputf8_enable": "no"})
    assert governing_key("STRASSE.example", keys, folding) == "stra\u00dfe.example"
    assert governing_key("mx.\u03a3\u03c2.example", keys, folding) == ".\u03c3\u03c3.example"
    assert governing_key("STRASSE.example", keys, exact) is None
    assert governing_key("STRA\u00dfE.example", keys, exact) == "stra\u00dfe.example"
    assert governing_key("Plain.Example", keys, exact) == "plain.example"


def test_explain_finds_the_policies_of_a_folded_key_and_shows_the_written_line() -> None:
    line, out = explain("STRASSE.example", _issue_policies())
    assert line == "stra\u00dfe.example secure match=nexthop"
    assert any("beat mail/plain" in ln for ln in out)


def test_a_folding_warning_makes_ready_false_and_a_conflict_names_the_winner() -> None:
    plain, sharp = _issue_policies()
    tables = render([plain, sharp], now=NOW)
    found = lint(tables.contributors, [], InstanceConfig())

    def ready_and_accepted(policy: Policy) -> list[tuple[str, str, str]]:
        rec = PolicyRecord(policy.namespace, policy.name, policy.uid, 1, policy, [], {})
        view = InstanceView("relay", tables.revision, 1, 1,
                            losses=tables.losses.get(policy.ref, []),
                            lines=tables.contributors.get(policy.ref, []),
                            warnings=found.get(policy.ref, []))
        return [(c.type, c.status, c.reason) for c in conditions_for(rec, [view], NOW)][:2]

    assert ready_and_accepted(sharp) == [("Ready", "False", KEY_FOLDING),
                                         ("Accepted", "True", "Valid")]
    assert ready_and_accepted(plain)[1] == ("Accepted", "False", "Conflict")
    rec = PolicyRecord(plain.namespace, plain.name, plain.uid, 1, plain, [], {})
    view = InstanceView("relay", tables.revision, 1, 1, losses=tables.losses[plain.ref])
    message = conditions_for(rec, [view], NOW)[1].message
    assert "strasse.example (one key with stra\u00dfe.example as Postfix folds case): " \
           "mail/sharp wins" in message
