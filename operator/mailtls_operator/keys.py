"""A table key as Postfix looks it up.  Pure: no Kubernetes, no I/O.

Postfix folds the case of a table's keys when ``postmap`` builds the table and
again when a key is looked up (``util/casefold.c``; measured on 3.7.11, see
docs/keys.md).  With ``smtputf8_enable = yes`` a key with a non-ASCII
character gets ICU's full default case folding (``ucasemap_utf8FoldCase`` with
``U_FOLD_CASE_DEFAULT``: ``straße`` -> ``strasse``, final sigma -> sigma,
``ﬃ`` -> ``ffi``), without normalisation (NFC and compatibility forms stay
apart); an all-ASCII key, or any key with ``smtputf8_enable = no``, gets ASCII
lower-casing only and its other bytes are compared exactly.  Two keys that fold
alike are one key to Postfix: ``postmap`` keeps the first line and warns, so the
renderer judges duplicates and conflicts on :func:`lookup_key`, never on the
spelling.  Python's :meth:`str.casefold` is that full folding (CaseFolding.txt
C+F); it agreed with the measured Postfix on every character tried.
"""

from __future__ import annotations

import unicodedata
from typing import Final

import idna

FULL_STOPS: Final = ".\u3002\uff0e\uff61"
"""The label separators IDNA (UTS #46) maps to ``.``: full stop, ideographic,
fullwidth and halfwidth ideographic full stops."""
_TO_DOT: Final = str.maketrans({c: "." for c in FULL_STOPS[1:]})
_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ",
                                    "abcdefghijklmnopqrstuvwxyz")


def lookup_key(key: str, *, smtputf8: bool) -> str:
    """``key`` exactly as a Postfix with this ``smtputf8_enable`` stores and looks it up."""
    if key.isascii():
        return key.lower()
    if smtputf8:
        return key.casefold()
    return key.translate(_ASCII_LOWER)


def folds(key: str, *, smtputf8: bool) -> bool:
    """Does Postfix store ``key`` under another spelling?  (False for every ASCII key
    the model writes: they are lower-case already.)"""
    return lookup_key(key, smtputf8=smtputf8) != key


def with_dots(name: str) -> str:
    """Every IDNA full stop as ``.``: one label separator, wherever it is written."""
    return name.translate(_TO_DOT)


def deleted_by_mapping(name: str) -> str | None:
    """The first character IDNA mapping would delete from ``name`` (UTS #46
    "ignored": soft hyphen, variation selectors, Hangul fillers, the combining
    grapheme joiner...), shown as ``U+XXXX``, or None.  Asked of the library's
    own table one code point at a time, so no list is kept here."""
    for char in name:
        if char.isascii() or char in FULL_STOPS:
            continue
        try:
            mapped = idna.uts46_remap(char, std3_rules=False, transitional=False)
        except (idna.IDNAError, UnicodeError, ValueError):
            continue  # disallowed: refused by the encoding that follows, with its reason
        if mapped == "":
            return f"U+{ord(char):04X}"
    return None


def unknown_character(name: str) -> str | None:
    """The first character this Python's Unicode database does not know, or None.

    Its case folding is unknown here, so whether Postfix's ICU folds it onto
    another key cannot be told: refused rather than guessed."""
    for char in name:
        if not char.isascii() and unicodedata.category(char) == "Cn":
            return f"U+{ord(char):04X}"
    return None


def _host(key: str) -> tuple[str, str, str]:
    """(prefix, host, suffix) of a table key: ``.`` or ``[`` before, ``]`` / ``:port`` after."""
    prefix = "." if key.startswith(".") else "[" if key.startswith("[") else ""
    rest = key[len(prefix):]
    if prefix == "[":
        host, _, tail = rest.partition("]")
        return prefix, host, "]" + tail
    host, colon, port = rest.partition(":")
    return prefix, host, colon + port


def _alabel(host: str) -> str | None:
    try:
        return idna.encode(host, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


def also_governs(key: str, *, smtputf8: bool = True) -> str | None:
    """The other name a U-label key answers for, or None.

    Postfix looks up the folded key, so ``straße.example`` also answers for
    ``strasse.example`` (a different registered domain: its A-label is not
    ``xn--strae-oqa.example``) and a final sigma for a medial one.  A fold
    that IDNA maps back to the same domain (a decomposed character) is not
    another name.  Returned as the A-label when the folded name is ASCII.
    """
    if key.isascii() or not smtputf8:
        return None
    folded = lookup_key(key, smtputf8=True)
    if folded == key:
        return None
    prefix, host, suffix = _host(key)
    _, folded_host, _ = _host(folded)
    mine, theirs = _alabel(host), _alabel(folded_host)
    if mine is not None and mine == theirs:
        return None
    return f"{prefix}{theirs or folded_host}{suffix}"
