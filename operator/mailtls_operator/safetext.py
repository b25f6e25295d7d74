"""What may be written into a Postfix table or a one-line message.  Pure.

Postfix splits table lines at newlines and a value's attributes at whitespace;
a person reads an error as one line.  One definition of "unsafe" serves the
model (refusing input), the renderer (refusing to write, whatever the validator
said) and the CLI (quoting what it refuses).
"""

from __future__ import annotations

import re
import unicodedata

_ASCII_UNSAFE = re.compile(r"[\x00-\x20\x7f]")

_JOINERS = frozenset("\u200c\u200d")
"""ZWNJ and ZWJ: format characters that IDNA2008 allows in some scripts (CONTEXTJ);
``idna`` decides those.  Every other control, format, separator, surrogate,
private-use or unassigned code point is unsafe (IDNA would silently map some of
them, a soft hyphen or a BOM, to nothing)."""


def unsafe_character(text: str) -> str | None:
    """The first character of ``text`` that must never reach a table, as ``U+XXXX``.

    Whitespace of any kind, control characters (C0, DEL, C1 such as U+0085),
    line and paragraph separators (U+2028, U+2029) and format characters.
    """
    if text.isascii():  # the common case, in C
        m = _ASCII_UNSAFE.search(text)
        return None if m is None else f"U+{ord(m.group()):04X}"
    for ch in text:
        if ch.isspace() or (unicodedata.category(ch)[0] in "CZ" and ch not in _JOINERS):
            return f"U+{ord(ch):04X}"
    return None


def shown(text: str) -> str:
    """``text`` quoted for a one-line message, every unsafe character escaped."""
    if unsafe_character(text) is None and '"' not in text and "\\" not in text:
        return f'"{text}"'
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif unsafe_character(ch) is not None and ch != " ":
            out.append(ch.encode("unicode_escape").decode("ascii") if ord(ch) < 0x10000
                       or ch.isprintable() else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def one_line(text: str) -> str:
    """``text`` with every unsafe character but the plain space escaped (for refs and
    messages that embed user data)."""
    return shown(text)[1:-1] if unsafe_character(text.replace(" ", "")) else text
