"""The real ``postmap`` folds keys as :func:`lookup_key` says, with ``smtputf8_enable`` yes
and no, and the issue's downgrade (``strasse.example none`` shadowing
``straße.example secure``) cannot happen: one line is written and the stricter one answers
for both names (docs/keys.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailtls_operator.keys import lookup_key
from mailtls_operator.render import render
from tests.unit.test_keys import MEASURED, _issue_policies
from tests.unit.test_render import NOW

pytestmark = pytest.mark.postfix
POSTMAP = "/usr/sbin/postmap"


@pytest.fixture(scope="module")
def config_dirs() -> Iterator[dict[bool, Path]]:
    """smtputf8_enable -> a configuration directory saying so (compatibility level 3.6)."""
    if shutil.which("postmap", path="/usr/sbin:/usr/bin") is None:
        pytest.skip("postmap not installed")
    base = Path(tempfile.mkdtemp(prefix="mailtls-fold-"))
    dirs = {}
    for smtputf8 in (True, False):
        path = base / ("yes" if smtputf8 else "no")
        path.mkdir()
        (path / "main.cf").write_text("compatibility_level = 3.6\nmyhostname = localhost\n"
                                      f"smtputf8_enable = {'yes' if smtputf8 else 'no'}\n")
        old = 1_000_000_000  # Postfix re-reads a main.cf younger than a second: age it
        os.utime(path / "main.cf", (old, old))
        dirs[smtputf8] = path
    yield dirs
    shutil.rmtree(base, ignore_errors=True)


def postmap(config_dir: Path, text: str, queries: Iterable[str],
            map_type: str = "lmdb") -> dict[str, str]:
    """Build ``text`` as a table, look every query up in one ``postmap -q -``: key -> value."""
    with tempfile.TemporaryDirectory(dir=config_dir) as tmp:
        table = Path(tmp) / "t"
        table.write_text(text, encoding="utf-8")
        subprocess.run([POSTMAP, "-c", str(config_dir), f"{map_type}:{table}"], check=True,
                       capture_output=True, timeout=60)
        out = subprocess.run([POSTMAP, "-c", str(config_dir), "-q", "-", f"{map_type}:{table}"],
                             input="".join(f"{q}\n" for q in queries).encode(),
                             capture_output=True, timeout=60, check=False)
    found = {}
    for line in out.stdout.decode("utf-8").splitlines():
        key, _, value = line.partition("\t")
        found[key] = value
    return found


@pytest.mark.parametrize("map_type", ["lmdb", "hash"])
def test_the_issue_policies_render_one_line_and_the_secure_one_answers(
        config_dirs: dict[bool, Path], map_type: str) -> None:
    tables = render(_issue_policies(), now=NOW)
    folded = [k for k in tables.tls_entries if lookup_key(k, smtputf8=True) == "strasse.example"]
    assert folded == ["stra\u00dfe.example"]
    found = postmap(config_dirs[True], tables.tls_policy,
                    ["stra\u00dfe.example", "strasse.example", "STRASSE.example"], map_type)
    assert found == dict.fromkeys(["stra\u00dfe.example", "strasse.example", "STRASSE.example"],
                                  "secure match=nexthop")


def test_without_smtputf8_each_name_answers_its_own_line(
        config_dirs: dict[bool, Path]) -> None:
    tables = render(_issue_policies(), now=NOW, smtputf8=False)
    found = postmap(config_dirs[False], tables.tls_policy,
                    ["stra\u00dfe.example", "strasse.example"])
    assert found == {"stra\u00dfe.example": "secure match=nexthop", "strasse.example": "none"}


def _agrees(config_dir: Path, smtputf8: bool, keys: list[str]) -> None:
    """Each key gets its own value; a key's answer is the first line folding alike (postmap
    keeps the first of duplicates), and the model's lookup key answers the same."""
    text = "".join(f"{k} v{i}\n" for i, k in enumerate(keys))
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(lookup_key(k, smtputf8=smtputf8), i)
    folded = [lookup_key(k, smtputf8=smtputf8) for k in keys]
    found = postmap(config_dir, text, [*keys, *folded])
    for k, f in zip(keys, folded, strict=True):
        assert found.get(k) == f"v{first[f]}", (ascii(k), smtputf8)
        assert found.get(f) == f"v{first[f]}", (ascii(f), smtputf8)


@pytest.mark.parametrize("smtputf8", [True, False])
def test_the_measured_pairs_hold_on_this_postfix(config_dirs: dict[bool, Path],
                                                 smtputf8: bool) -> None:
    for a, b, yes, no in MEASURED:
        found = postmap(config_dirs[smtputf8], f"{a} first\n", [a, b])
        assert found.get(a) == "first"
        assert (found.get(b) == "first") is (yes if smtputf8 else no), (ascii(a), ascii(b))


TRICKY = ("\u00df\u1e9e\u03c2\u03c3\u03a3\u0131\u0130i\u0307I\u13a0\uab70\u13f8\u13f0"
          "\ufb03\ufb05\u017f\u212a\u212b\u00e5\u00c5\uff21\uff41\u03ac\u1f71\u0390\u1fd3"
          "\u1fbc\u1fb3\u01c4\u01c5\u01c6\u0345\u00b5\u03bc\u0587\u00e9e\u0301SsKk")
LETTER = st.one_of(st.sampled_from(TRICKY),
                   st.characters(categories=("Lu", "Ll", "Lt", "Lm", "Lo", "Mn"),
                                 max_codepoint=0xFFFF))
KEY = st.text(LETTER, min_size=1, max_size=4).map(lambda label: f"{label}.example")


@pytest.mark.parametrize("smtputf8", [True, False])
@settings(max_examples=3, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(KEY, min_size=200, max_size=200))
def test_lookup_key_agrees_with_postmap_on_generated_keys(
        config_dirs: dict[bool, Path], smtputf8: bool, keys: list[str]) -> None:
    _agrees(config_dirs[smtputf8], smtputf8, keys)


@pytest.mark.slow
@pytest.mark.parametrize("smtputf8", [True, False])
def test_lookup_key_agrees_with_postmap_on_every_assigned_character(
        config_dirs: dict[bool, Path], smtputf8: bool) -> None:
    """Every non-ASCII letter, mark, number, punctuation and symbol this Python knows, up to
    U+2FFFF, as a one-character label: 139,242 keys, one table (about 8 s each way)."""
    keys = [f"{chr(c)}.example" for c in range(0x80, 0x30000)
            if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c))[0] in "LMNPS"]
    _agrees(config_dirs[smtputf8], smtputf8, keys)
