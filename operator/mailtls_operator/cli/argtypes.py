"""Number options, parsed strictly: an argparse error (exit 2, one line) for anything
but an ASCII decimal number inside the option's range.

Python's ``float()`` takes ``nan``, ``inf``, ``1e308`` and non-ASCII digits, and
``int()`` takes ``٣``; none of them is a sensible timeout or day count, and each
has crashed or hung a command (``timedelta(days=1e308)`` overflows, a NaN
timeout never expires).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

from ..loader import clip

_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?", re.ASCII)
_INTEGER = re.compile(r"[+-]?[0-9]{1,18}", re.ASCII)


def _range(low: float, high: float, low_open: bool) -> str:
    return f"{'greater than' if low_open else 'at least'} {low:g} and at most {high:g}"


def bounded_float(low: float, high: float, *, low_open: bool = False
                  ) -> Callable[[str], float]:
    """An argparse ``type``: a decimal number in [low, high] (or (low, high])."""

    def parse(text: str) -> float:
        if not _DECIMAL.fullmatch(text):
            raise argparse.ArgumentTypeError(f"not a decimal number: {clip(text)}")
        value = float(text)
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(
                f"{clip(text)}: must be {_range(low, high, low_open)}")
        return value

    parse.__name__ = "number"  # argparse names the type in its message
    return parse


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type``: an ASCII decimal integer in [low, high]."""

    def parse(text: str) -> int:
        if not _INTEGER.fullmatch(text):
            raise argparse.ArgumentTypeError(f"not a decimal integer: {clip(text)}")
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{clip(text)}: must be {_range(low, high, False)}")
        return value

    parse.__name__ = "integer"
    return parse


def listen_address(text: str) -> str:
    """An argparse ``type`` for ``HOST:PORT`` listen options (``--health``, ``--metrics``):
    checked here, so a bad port is a usage error before the operator connects anywhere;
    the text is returned as given."""
    host, colon, port = text.rpartition(":")
    if not colon or not re.fullmatch(r"[0-9]{1,5}", port, re.ASCII) \
            or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{clip(text)}: expected HOST:PORT with a port "
                                         "1-65535")
    if host and not re.fullmatch(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]", host, re.ASCII):
        raise argparse.ArgumentTypeError(f"{clip(text)}: not an address or host name")
    return text


def listen_address_or_off(text: str) -> str:
    """:func:`listen_address`, or ``off`` (``--metrics off``)."""
    return text if text == "off" else listen_address(text)
