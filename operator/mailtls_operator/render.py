"""Policies -> Postfix tables + revision.  Pure: no Kubernetes, no I/O.

One pass over the policies keeps, per key, the entry that wins (DESIGN.md §4),
then one sort of the keys: O(n log n) in the number of entries, with no
per-key rescans.  Identical input gives byte-identical output, whatever the
order the policies arrive in, so the revision (sha256 of the tables) changes
exactly when what Postfix would do changes.
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from itertools import groupby, islice

from .conflicts import LOST_TO_CONFLICT as LOST_TO_CONFLICT
from .conflicts import LOST_TO_EXCEPTION as LOST_TO_EXCEPTION
from .conflicts import Loss as Loss
from .conflicts import beats as beats
from .conflicts import resolve
from .policy import LEVELS, Policy
from .safetext import shown, unsafe_character

REVISION_KEY = "mailtls-revision.invalid"
"""A key that can never be a real next-hop (RFC 2606 ``.invalid``): its value
carries the revision, so ``postmap -q`` proves which table a pod has live."""

HEADER = "# Managed by mailtls-operator from MailTLSPolicy objects: edits are overwritten."


@dataclass(frozen=True)
class Tables:
    """The rendered tables of one instance (or of everything, offline)."""

    revision: str
    tls_policy: str
    transport: str
    tls_entries: Mapping[str, str]
    transport_entries: dict[str, str]
    owners: Mapping[str, str]
    """key -> namespace/name of the policy whose line it is."""
    losses: dict[str, list[Loss]] = field(default_factory=dict)
    """namespace/name -> keys it declared but did not get."""
    contributors: Lines = field(default_factory=lambda: Lines({}, {}))
    """namespace/name -> table lines it contributes (``KEY VALUE``)."""
    refused: dict[str, str] = field(default_factory=dict)
    """namespace/name -> why its lines were not written (an unsafe key or value that
    no validator should have let through: defence in depth)."""

    @property
    def short_revision(self) -> str:
        return self.revision[:16]

    def revision_value(self) -> str:
        return revision_value(self.revision)


def revision_value(revision: str) -> str:
    """The value of :data:`REVISION_KEY`: valid policy syntax, never used for mail."""
    return f"secure match=rev-{revision[:16]}"


def select(policies: Iterable[Policy], instance: tuple[str, str] | None,
           now: datetime | None) -> list[Policy]:
    """The policies that write lines to ``instance`` (namespace, name), or all offline.

    Audit-mode policies and exceptions outside their window write nothing.
    """
    out = []
    for p in policies:
        if p.mode == "audit" or (now is not None and (p.is_expired(now) or p.is_scheduled(now))):
            continue
        if instance is not None and (p.namespace != instance[0] or not p.targets(instance[1])):
            continue
        out.append(p)
    return out


_ASCII_UNSAFE_KEYS = re.compile(r"[\x01-\x20\x7f]")
_ASCII_UNSAFE_VALUE = re.compile(r"[\x00-\x1f\x7f]")


def unsafe_entry(policy: Policy) -> str | None:
    """Why ``policy``'s lines must not be written, or None.

    The last gate before Postfix, whatever the validators said: a key is one
    token, a value is a known level and single-space-separated tokens; none holds
    whitespace, a control or format character, and no key starts a comment.
    Postfix's table reader would otherwise start a new entry or cut attributes
    off (a silent downgrade).
    """
    joined = "\0".join(policy.keys)
    value = policy.value
    if joined.isascii() and joined.count("\0") == len(policy.keys) - 1 and joined \
            and not joined.startswith(("#", "\0")) and not joined.endswith("\0") \
            and "\0\0" not in joined and "\0#" not in joined \
            and not _ASCII_UNSAFE_KEYS.search(joined) and value.isascii() \
            and not _ASCII_UNSAFE_VALUE.search(value) and "  " not in value \
            and not value.endswith(" ") and value.split(" ", 1)[0] in LEVELS:
        return None  # the common case, checked in C; anything else gets the full reason
    for key in policy.keys:
        bad = unsafe_character(key)
        if not key or bad is not None or key.startswith("#"):
            return f"key {shown(key)} is not one table token ({bad or 'empty or #'})"
    tokens = policy.value.split(" ")
    for token in tokens:
        bad = unsafe_character(token)
        if not token or bad is not None:
            return f"value {shown(policy.value)} is not single-space-separated tokens " \
                   f"({bad or 'empty token'})"
    if tokens[0] not in LEVELS:
        return f"value {shown(policy.value)} does not start with a TLS security level"
    return None


def render(policies: Iterable[Policy], *, instance: tuple[str, str] | None = None,
           now: datetime | None = None, smtputf8: bool = True) -> Tables:
    """Render the tables for ``instance`` from every policy that targets it.

    A policy with an unsafe key or value (see :func:`unsafe_entry`) writes
    nothing and is reported in ``Tables.refused``; the rest of the table stands.

    Keys are contested as the instance's Postfix looks them up (``smtputf8`` is
    its ``smtputf8_enable``; yes, the default since compatibility level 1, when
    unknown): no two lines fold to one key, so none is ever shadowed.

    Built for a million entries: the only per-key structure is one dict (key ->
    winning policy); entries, owners and each policy's lines are views over it
    and over the policies' own key tuples, never copies of the line strings.
    """
    chosen: list[Policy] = []
    refused: dict[str, str] = {}
    for p in select(policies, instance, now):
        why = unsafe_entry(p)
        if why is None:
            chosen.append(p)
        else:
            refused[p.ref] = why
    resolution = resolve(chosen, smtputf8=smtputf8)
    winner, losses, contributed = resolution.winner, resolution.losses, resolution.contributed
    del resolution
    keys = sorted(winner)
    owners = [winner[k] for k in keys]  # parallel to keys; the dict goes before the text
    del winner
    transport_entries = {k: f"smtp:{_nexthop(k)}" for k, p in zip(keys, owners, strict=True)
                         if p.route == "direct"}
    transport_body = _body(transport_entries, _Owners(keys, owners))
    digest = hashlib.sha256()
    for chunk in _runs(keys, owners):  # first pass: the revision, no text kept
        digest.update(chunk.encode("utf-8"))
    digest.update(("\0" + transport_body).encode("utf-8"))
    revision = digest.hexdigest()
    where = f"{instance[0]}/{instance[1]}" if instance else "all policies"
    head = f"{HEADER}\n# instance: {where}\n# revision: {revision}\n"
    tls_text = _joined(f"{head}{REVISION_KEY} {revision_value(revision)}\n",
                       _runs(keys, owners))  # second pass: the text
    transport_text = f"{head}{transport_body}" if transport_entries else ""
    values = {p.ref: p.value for p in chosen}
    return Tables(revision=revision, tls_policy=tls_text, transport=transport_text,
                  tls_entries=_Entries(keys, owners, revision_value(revision)),
                  transport_entries=transport_entries, owners=_Owners(keys, owners),
                  losses=losses, contributors=Lines(contributed, values), refused=refused)


def _joined(first: str, chunks: Iterator[str]) -> str:
    """``first`` and the chunks as one string, joined a few thousand chunks at a time: a
    million entries make 500,000 small chunk strings, whose object headers alone weighed
    25 MiB when all were held for one join (the render's peak)."""
    parts = [first]
    while batch := "".join(islice(chunks, 4096)):
        parts.append(batch)
    return "".join(parts)


def _runs(keys: list[str], owners: list[Policy]) -> Iterator[str]:
    """The TLS table body in chunks: ``# ns/name`` then ``KEY VALUE`` lines for each run of
    keys with one owner, joined in C (``" VALUE\\n".join(keys)``), so no per-line string
    ever exists.  Made twice per render (hash, then text): cheaper than keeping them."""
    position = 0
    for _, run in groupby(owners, key=id):  # identity, in C (a dataclass == is slow)
        same = list(run)
        owner, n = same[0], len(same)
        sep = f" {owner.value}\n"
        yield f"# {owner.ref}\n{sep.join(keys[position:position + n])}{sep}"
        position += n


class _Sorted:
    """Lookups in the sorted key list (bisect) instead of a dict: a million entries cost
    two lists, not a 40 MiB hash table."""

    __slots__ = ("_keys", "_owners")

    def __init__(self, keys: list[str], owners: list[Policy]) -> None:
        self._keys, self._owners = keys, owners

    def _owner(self, key: object) -> Policy | None:
        if not isinstance(key, str):
            return None
        i = bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            return self._owners[i]
        return None


class _Entries(_Sorted, Mapping[str, str]):
    """key -> value, the revision key first, then sorted keys: a view, not a copy."""

    __slots__ = ("_revision_value",)

    def __init__(self, keys: list[str], owners: list[Policy], rv: str) -> None:
        super().__init__(keys, owners)
        self._revision_value = rv

    def __getitem__(self, key: str) -> str:
        if key == REVISION_KEY:
            return self._revision_value
        owner = self._owner(key)
        if owner is None:
            raise KeyError(key)
        return owner.value

    def __iter__(self) -> Iterator[str]:
        yield REVISION_KEY
        yield from self._keys

    def __len__(self) -> int:
        return len(self._keys) + 1

    def __contains__(self, key: object) -> bool:
        return key == REVISION_KEY or self._owner(key) is not None


class _Owners(_Sorted, Mapping[str, str]):
    """key -> namespace/name of the policy whose line it is: a view."""

    __slots__ = ()

    def __getitem__(self, key: str) -> str:
        owner = self._owner(key)
        if owner is None:
            raise KeyError(key)
        return owner.ref

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return self._owner(key) is not None


class Lines(Mapping[str, list[str]]):
    """namespace/name -> its ``KEY VALUE`` lines, made when asked (a status shows 500 of
    them at most); stored as the policy's own key tuple and value."""

    __slots__ = ("_keys", "_values")

    def __init__(self, keys: dict[str, tuple[str, ...]], values: dict[str, str]) -> None:
        self._keys, self._values = keys, values

    def __getitem__(self, ref: str) -> list[str]:
        value = self._values[ref]
        return [f"{k} {value}" for k in self._keys[ref]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, ref: object) -> bool:
        return ref in self._keys

    def keys_of(self, ref: str) -> tuple[str, ...]:
        """The keys ``ref`` contributes, without building its lines."""
        return self._keys.get(ref, ())

    def entry(self, ref: str) -> tuple[tuple[str, ...], str]:
        """(keys, value) of ``ref``: identifies its lines without making them (the keys
        are the policy's own tuple, the value its own string: nothing is copied)."""
        return self._keys[ref], self._values[ref]


def _nexthop(key: str) -> str:
    """Transport next-hop for a plain domain key: the A-label, so the TLS policy
    lookup (by next-hop) hits the same key for ASCII and SMTPUTF8 mail."""
    if key.isascii():
        return key
    import idna  # only IDN keys pay for it

    return idna.encode(key, uts46=True).decode("ascii")


def _body(entries: Mapping[str, str], owners: Mapping[str, str]) -> str:
    """``KEY VALUE`` lines sorted by key, each run of lines under a ``# ns/name`` line."""
    lines: list[str] = []
    last = None
    for key, value in entries.items():
        owner = owners[key]
        if owner != last:
            lines.append(f"# {owner}")
            last = owner
        lines.append(f"{key} {value}")
    return "".join(line + "\n" for line in lines)
