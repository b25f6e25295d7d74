"""Where Postfix sends a message, and so which TLS policy key it looks up.  Pure.

DESIGN.md §5 (the relayhost trap): the TLS policy table is looked up with the
*next-hop*, not the recipient domain.  One place decides the next-hop for the
rollout's lint (:func:`bypassed_keys`, :func:`lint`), the queue attribution
(:func:`governing_key`) and the pod check (:func:`table_problems`), from the
instance's routing facts (:class:`InstanceConfig`, the ``postconf -x`` values
read once per cycle) and transport entries.  No I/O: the values come in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from . import postfix
from .keys import also_governs, lookup_key
from .render import REVISION_KEY
from .status import DNSSEC_DISABLED, KEY_FOLDING, POLICY_BYPASSED

ROUTING_PARAMS: Final = (*postfix.INSTANCE_PARAMS, "default_transport", "smtputf8_enable")
"""The main.cf parameters :class:`InstanceConfig` is made of."""


def split_list(value: str) -> tuple[str, ...]:
    """A main.cf list value (whitespace or commas) as its items."""
    return tuple(p for p in re.split(r"[\s,]+", value.strip()) if p)


@dataclass(frozen=True)
class InstanceConfig:
    """The routing-relevant main.cf values of a running instance (``postconf -x``)."""

    relayhost: str = ""
    transport_maps: str = ""
    smtp_tls_policy_maps: str = ""
    smtp_dns_support_level: str = ""
    default_transport: str = "smtp"
    smtputf8_enable: str = "yes"

    @property
    def smtputf8(self) -> bool:
        """Does this Postfix fold UTF-8 keys (docs/keys.md)?  Unless it says ``no``: folding
        judges more keys alike, so assuming it never lets a line shadow another."""
        return self.smtputf8_enable.strip().lower() != "no"

    @classmethod
    def from_postconf(cls, values: Mapping[str, str]) -> InstanceConfig:
        return cls(
            relayhost=values.get("relayhost", ""),
            transport_maps=values.get("transport_maps", ""),
            smtp_tls_policy_maps=values.get("smtp_tls_policy_maps", ""),
            smtp_dns_support_level=values.get("smtp_dns_support_level", ""),
            default_transport=values.get("default_transport", "smtp"),
            smtputf8_enable=values.get("smtputf8_enable", "yes"),
        )

    @property
    def relay_nexthops(self) -> tuple[str, ...]:
        """Next-hops every non-routed message goes to: ``relayhost`` (a list since
        Postfix 3.5), or the next-hop of ``default_transport = smtp:[host]``."""
        hops = split_list(self.relayhost)
        if not hops:
            _, sep, nexthop = self.default_transport.partition(":")
            if sep and nexthop.strip():
                hops = split_list(nexthop)
        return tuple(h.lower() for h in hops)

    @property
    def transport_tables(self) -> tuple[str, ...]:
        return split_list(self.transport_maps)


class MapLocation(Protocol):
    """Where the operator writes an instance's table (a rollout target)."""

    @property
    def map_type(self) -> str: ...

    @property
    def map_path(self) -> str: ...


def table_problems(config: InstanceConfig, target: MapLocation) -> list[str]:
    """Why the tables written to ``target`` would not be used by this instance, if so.

    A rollout into a pod whose main.cf does not name the managed table
    "succeeds" and changes nothing; say so instead.  ``proxy:`` is looked
    through (``proxy:lmdb:/path`` uses ``/path``).  The transport table only
    matters when there are routes, so it is checked by ``bypassed_keys``.
    """
    wanted = postfix.map_spec(target.map_type, target.map_path)
    used = [t.removeprefix("proxy:") for t in split_list(config.smtp_tls_policy_maps)]
    if wanted in used:
        return []
    return [f"smtp_tls_policy_maps is {config.smtp_tls_policy_maps or '(empty)'!r}, "
            f"not {wanted}: the instance never reads the table the operator writes"]


def bypassed_keys(keys: Iterable[str], config: InstanceConfig,
                  routed_keys: Iterable[str] = (), *,
                  transport_table: str | None = None) -> list[str]:
    """Policy keys this instance can never look up (the relayhost trap).

    The TLS policy table is looked up with the next-hop verbatim.  With a
    relay next-hop (``relayhost``, or ``default_transport`` with a next-hop),
    every message not routed by ``transport_maps`` has that next-hop, so a key
    is used only if it *is* a relay next-hop verbatim (``[host]:port`` as
    written in main.cf) or it is in ``routed_keys`` (keys whose next-hop a
    transport entry makes equal to the key: ``route: direct``).  Routed keys
    count only if the instance has ``transport_maps`` at all, and, when
    ``transport_table`` (``TYPE:PATH``) is given, only if that table is in it.
    Without a relay next-hop nothing is bypassed here.  Sorted, without duplicates.
    """
    relays = set(config.relay_nexthops)
    if not relays:
        return []
    tables = [t.removeprefix("proxy:") for t in config.transport_tables]
    routing = bool(tables) and (transport_table is None or transport_table in tables)
    routed = set(routed_keys) if routing else set()
    return sorted({k for k in keys
                   if k != REVISION_KEY and k.lower() not in relays and k not in routed})


def lint(contributors: Mapping[str, Iterable[str]], routed_keys: Iterable[str],
         config: InstanceConfig) -> dict[str, list[tuple[str, str]]]:
    """Instance-aware warnings per policy ref (DESIGN.md §5, §10), from its table lines
    (``key level ...``): keys the instance's routing never looks up, ``dane``
    without DNSSEC (Postfix then sends in clear text), and U-label keys that this
    Postfix's case folding makes answer for another name too."""
    routed = set(routed_keys)
    out: dict[str, list[tuple[str, str]]] = {}
    for ref, lines in contributors.items():
        lines = list(lines)
        keys = [ln.split(" ", 1)[0] for ln in lines]
        levels = {ln.split(" ")[1] for ln in lines}
        if levels & {"dane", "dane-only"} and config.smtp_dns_support_level != "dnssec":
            out.setdefault(ref, []).append((
                DNSSEC_DISABLED,
                f"smtp_dns_support_level is {config.smtp_dns_support_level or 'unset'!r}, "
                "not 'dnssec': Postfix ignores dane here and sends in clear text"))
        bypassed = bypassed_keys(keys, config, routed)
        if bypassed:
            out.setdefault(ref, []).append((
                POLICY_BYPASSED,
                f"relayhost {config.relayhost} is the next-hop for {', '.join(bypassed[:5])}"
                f"{' ...' if len(bypassed) > 5 else ''}: these keys are never looked up "
                "(set route: direct or route the domains in transport_maps)"))
        folding = folding_warning(keys, smtputf8=config.smtputf8)
        if folding:
            out.setdefault(ref, []).append((KEY_FOLDING, folding))
    return out


def folding_warning(keys: Iterable[str], *, smtputf8: bool = True) -> str | None:
    """One message naming every other name these keys answer for, or None."""
    pairs = [(k, other) for k in keys if (other := also_governs(k, smtputf8=smtputf8))]
    if not pairs:
        return None
    shown = ", ".join(f"{k} also answers for {other}" for k, other in pairs[:5])
    return (f"Postfix folds the case of UTF-8 keys (smtputf8_enable = yes): {shown}"
            f"{' ...' if len(pairs) > 5 else ''}, a different domain")


# -- which policy key governs a recipient ---------------------------------------------

_NO_TLS_TRANSPORTS: Final = frozenset({"error", "retry", "discard", "local", "virtual",
                                       "lmtp", "pipe"})
"""Transports that never consult ``smtp_tls_policy_maps`` (lmtp has its own map)."""
_HOSTNAME: Final = re.compile(r"[^\s\[\]:/@]+")


def transport_lookup(domain: str, entries: Mapping[str, str]) -> str | None:
    """The transport entry for ``domain`` in transport(5) order: the domain, then
    ``.parent`` walking up, then ``*`` (parent_domain_matches_subdomains without
    transport_maps, the default)."""
    if domain in entries:
        return entries[domain]
    rest = domain
    while "." in rest:
        rest = rest.split(".", 1)[1]
        if f".{rest}" in entries:
            return entries[f".{rest}"]
    return entries.get("*")


def route_nexthop(entry: str) -> str | None:
    """The explicit next-hop of a transport entry (``smtp:[mx.example]:25`` ->
    ``[mx.example]:25``, lower-cased), or None when it names none or its transport never
    reads the TLS policy table (TLSRPT attribution indexes the routes by it)."""
    channel, _, hop = entry.strip().partition(":")
    if channel.strip().lower() in _NO_TLS_TRANSPORTS or not hop.strip():
        return None
    return hop.strip().lower()


def nexthops(domain: str, config: InstanceConfig,
             transport_entries: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
    """The next-hop(s) smtp(8) uses for ``domain``, or None if mail to it does not go
    through an SMTP client that reads the TLS policy table.

    ``transport_entries`` are the instance's transport table entries
    (``domain`` -> ``transport:nexthop``; the operator's routes, plus the
    site's own if known).  A ``transport:`` entry with an empty next-hop
    resets it to the recipient domain (bypassing the relayhost); ``:`` keeps
    the default.  Without a route, the relay next-hop(s) (``relayhost``, or
    ``default_transport = smtp:[host]``) win, else the recipient domain.
    """
    domain = domain.rstrip(".").lower()
    relays = config.relay_nexthops
    default: tuple[str, ...] = relays if relays else (domain,)
    entry = transport_lookup(domain, transport_entries or {})
    if entry is None:
        return default
    channel, _, hop = entry.strip().partition(":")
    channel = channel.strip().lower()
    hop = hop.strip()
    if channel and channel in _NO_TLS_TRANSPORTS:
        return None
    if hop:
        return (hop.lower(),)
    return (domain,) if channel else default


def policy_lookup(nexthop: str, table_keys: Iterable[str], *,
                  smtputf8: bool = True) -> str | None:
    """The TLS policy key Postfix uses for ``nexthop`` (smtp_tls_policy.c).

    A bare host or domain name is looked up as itself, then as ``.parent``
    walking up (``a.b.example`` -> ``.b.example`` -> ``.example``); anything
    else (``[host]``, ``[host]:port``, ``host:port``) only verbatim.
    Case-insensitive as Postfix's table lookups are: each side folded by
    :func:`.keys.lookup_key` (``STRASSE.example`` finds ``straße.example`` when the
    instance folds UTF-8 keys).
    """
    keys = table_keys if isinstance(table_keys, (set, frozenset)) else set(table_keys)
    name = nexthop.lower()
    found: Mapping[str, str] | None = None  # lookup key -> table key, when folding matters
    if not (name.isascii() and all(k.isascii() for k in keys)):
        found = {lookup_key(k, smtputf8=smtputf8): k for k in keys}
        name = lookup_key(nexthop, smtputf8=smtputf8)

    def table_key(candidate: str) -> str | None:
        if found is None:
            return candidate if candidate in keys else None
        return found.get(candidate)

    if (key := table_key(name)) is not None:
        return key
    if not _HOSTNAME.fullmatch(name):
        return None
    rest = name
    while "." in rest[1:]:
        rest = rest[rest.index(".", 1):]
        if (key := table_key(rest)) is not None:
            return key
    return None


def governing_key(recipient_domain: str, table_keys: Iterable[str], config: InstanceConfig,
                  transport_entries: Mapping[str, str] | None = None) -> str | None:
    """The TLS policy key that governs delivery to ``recipient_domain``, or None.

    Same routing as :func:`bypassed_keys`: with a relayhost and no transport
    route the next-hop is the relayhost, so a key for the recipient domain
    does not govern it (the relayhost trap).  With several relay next-hops,
    the first one with a key counts.
    """
    hops = nexthops(recipient_domain, config, transport_entries)
    if not hops:
        return None
    keys = table_keys if isinstance(table_keys, (set, frozenset)) else set(table_keys)
    keys = {k for k in keys if k != REVISION_KEY}
    for hop in hops:
        key = policy_lookup(hop, keys, smtputf8=config.smtputf8)
        if key is not None:
            return key
    return None
