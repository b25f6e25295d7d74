"""JSON from another process (an agent's report, the operator's ``agent.json``) read as
untrusted: bounded in size and depth *before* parsing, standard JSON only.  Pure.

``json.loads`` alone is not total: nesting a few thousand deep raises RecursionError
(and deep enough input can exhaust the C stack), ``NaN``/``Infinity`` are accepted,
``1e999`` becomes ``inf``, and a 5,000-digit integer raises past Python's
int-conversion limit -- or, below it, becomes an integer no Kubernetes field can
hold.  :func:`loads` refuses all of them with a :class:`ValueError` naming the
reason, and never raises anything else.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 32
"""Deepest nesting of arrays/objects accepted (our documents nest 5 deep at most)."""
MAX_INT_DIGITS = 19
"""int64 has at most 19 digits: a longer integer is no count or time we write."""

_TOKEN = re.compile(r'\\.|["\[\]{}]', re.DOTALL)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits is out of range")
    return int(text)


def depth(text: str, stop_above: int | None = None) -> int:
    """The deepest bracket nesting of ``text`` outside string literals: one linear pass
    over quotes, brackets and backslash pairs, no backtracking (a regular expression for
    whole string literals is quadratic on ``"\\"\\"...`` without an end) and no recursion."""
    deepest = level = 0
    in_string = False
    for m in _TOKEN.finditer(text):
        token = m.group()
        if len(token) == 2:  # a backslash pair: an escape inside a string
            if in_string:
                continue
            token = token[1]  # outside one it is invalid JSON; the next character counts
        if token == '"':
            in_string = not in_string
        elif not in_string:
            level += 1 if token in "[{" else -1
            if level > deepest:
                deepest = level
                if stop_above is not None and deepest > stop_above:
                    break  # deep enough to refuse: the rest need not be read
    return deepest


def loads(text: Any, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Standard JSON within ``max_bytes`` (UTF-8) and ``max_depth``; :class:`ValueError`
    otherwise (also for a non-string, a bad encoding, NaN, infinities, huge integers)."""
    if not isinstance(text, str):
        raise ValueError(f"not a string but {type(text).__name__}")
    if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ValueError(f"longer than {max_bytes} bytes")
    if text.count("[") + text.count("{") > max_depth and depth(text, max_depth) > max_depth:
        raise ValueError(f"nested more than {max_depth} deep")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite,
                          parse_int=_bounded_int)
    except RecursionError:  # unreachable after the depth check; kept total regardless
        raise ValueError("nested too deep") from None
    except ValueError as exc:  # JSONDecodeError is one
        raise ValueError(str(exc)[:200]) from None
