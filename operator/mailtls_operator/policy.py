"""MailTLSPolicy: load, validate, normalise.  Pure: no Kubernetes, no I/O.

A policy is refused as a whole, with every error as ``spec.<field>: <reason>``,
or it becomes a frozen :class:`Policy` whose keys and value are safe to write
into a Postfix table: the CRD's schema and CEL rules (via :mod:`.crd`) refuse
what the API server refuses, and this module adds what a schema cannot express
(IDNA, ports, IP literals, duplicates after normalisation, repeated protocols,
the exception window).  Nothing a user writes reaches a table unchecked.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import sys
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import idna

from .crd import FieldError, validate_with_crd
from .safetext import one_line, shown, unsafe_character

LEVELS = ("none", "may", "encrypt", "dane", "dane-only", "fingerprint", "verify", "secure")

# Strength ranks (DESIGN.md §4): none < may < {encrypt, dane} < {dane-only,
# fingerprint, verify, secure}.  Equal ranks with different settings are not
# comparable; the oldest policy wins those.
RANK = {"none": 0, "may": 1, "encrypt": 2, "dane": 2,
        "dane-only": 3, "fingerprint": 3, "verify": 3, "secure": 3}

DEFAULT_MAX_EXCEPTION = timedelta(days=30)

# Where a policy comes from, strongest first after break-glass exceptions
# (DESIGN.md §11): a team's explicit policy > DANE > MTA-STS, whatever the levels.
SOURCE_TIER = {"static": 2, "dane": 1, "mta-sts": 0}

_LDH = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_BRACKET = re.compile(r"\[([^\]]*)\](?::([0-9]+))?")
_PORTED = re.compile(r"(.*?)(?::([0-9]+))?", re.DOTALL)
_PROTOCOL = re.compile(r"(!|>=|<=)?(.+)")


class PolicyInvalid(Exception):
    """The policy is refused; ``errors`` says where and why."""

    def __init__(self, ref: str, errors: list[FieldError]) -> None:
        self.ref = ref
        self.errors = errors
        super().__init__(f"{ref}: " + "; ".join(str(e) for e in errors))


@dataclass(frozen=True, slots=True)
class Exception_:
    """A break-glass override: wins for its keys from ``starts_at`` until ``expires_at``."""

    starts_at: datetime
    expires_at: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class Policy:
    """A valid, normalised MailTLSPolicy.

    Slotted, and its short strings shared: 10,000 of them stay in memory for the
    operator's lifetime (the table is rendered from them on every change)."""

    namespace: str
    name: str
    level: str
    keys: tuple[str, ...]
    value: str
    uid: str = ""
    generation: int = 0
    created: datetime = datetime(1970, 1, 1, tzinfo=UTC)
    route: str | None = None
    instances: tuple[str, ...] = ()
    mode: str = "enforce"
    exception: Exception_ | None = None
    tafile: tuple[str, ...] = ()
    source: str = "static"
    ref: str = field(init=False, compare=False, repr=False)
    """``namespace/name``: one string per policy, shared by every index keyed on it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ref", f"{self.namespace}/{self.name}")

    @property
    def rank(self) -> int:
        return RANK[self.level]

    def age_key(self) -> tuple[datetime, str, str]:
        """Oldest first: creationTimestamp, then namespace/name (DESIGN.md §4)."""
        return (self.created, self.namespace, self.name)

    def targets(self, instance: str) -> bool:
        return not self.instances or instance in self.instances

    def is_expired(self, now: datetime) -> bool:
        return self.exception is not None and self.exception.expires_at <= now

    def is_scheduled(self, now: datetime) -> bool:
        """An exception whose window has not begun: it writes nothing yet."""
        return self.exception is not None and now < self.exception.starts_at


# ------------------------------------------------------------------ destinations


def _hostname(raw: str, where: str) -> tuple[list[str], list[FieldError]]:
    """A host or domain name -> its keys: one for ASCII, A-label + U-label for IDN."""
    name = raw[:-1] if raw.endswith(".") else raw
    if not name:
        return [], [FieldError(where, "Invalid value: empty host name")]
    ascii_only = name.isascii()
    try:
        if ascii_only:
            alabel = name.lower()
            for label in alabel.split("."):
                if not _LDH.fullmatch(label):
                    raise idna.IDNAError(f"label {label!r} is not a valid host name label")
            ulabel = idna.decode(alabel) if "xn--" in alabel else alabel
        else:
            nfc = unicodedata.normalize("NFC", name)
            alabel = idna.encode(nfc, uts46=True, transitional=False).decode("ascii")
            ulabel = idna.decode(alabel)
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        return [], [FieldError(where, f"Invalid value: {raw!r}: not a valid host name ({exc})")]
    if len(alabel) > 253:
        return [], [FieldError(where, f"Invalid value: {raw!r}: longer than 253 characters")]
    keys = [alabel] if ulabel == alabel else [alabel, unicodedata.normalize("NFC", ulabel)]
    return keys, []


def _port(text: str | None, where: str) -> tuple[str, list[FieldError]]:
    if text is None:
        return "", []
    if not 1 <= int(text) <= 65535 or text.startswith("0"):
        return "", [FieldError(where, f"Invalid value: port {text}: must be 1-65535")]
    return f":{int(text)}", []


def normalise_destination(raw: str, where: str) -> tuple[list[str], list[FieldError]]:
    """One destination -> its table keys (lower-case, no trailing dot, IDN twice).

    Forms (postconf(5) smtp_tls_policy_maps): ``domain``, ``.domain``,
    ``domain:port``, ``[host]``, ``[host]:port``, ``[ipv4]``, ``[ipv6:addr]``.
    Whitespace, control and format characters are refused first, whatever the
    CRD's pattern let through (it admits any non-ASCII character, for IDN).
    """
    bad = unsafe_character(raw)
    if bad is not None:
        return [], [FieldError(where, f"Invalid value: {shown(raw)}: contains {bad}, a space, "
                                      "control or format character")]
    bracket = _BRACKET.fullmatch(raw)
    if bracket:
        host, port_text = bracket.group(1), bracket.group(2)
        port, errors = _port(port_text, where)
        if errors:
            return [], errors
        if host.lower().startswith("ipv6:"):
            try:
                addr6 = ipaddress.IPv6Address(host[5:])
            except ValueError:
                return [], [FieldError(where, f"Invalid value: {raw!r}: not an IPv6 address")]
            return [f"[ipv6:{addr6.compressed}]{port}"], []
        if re.fullmatch(r"[0-9.]+", host):
            try:
                addr4 = ipaddress.IPv4Address(host)
            except ValueError:
                return [], [FieldError(where, f"Invalid value: {raw!r}: not an IPv4 address")]
            return [f"[{addr4}]{port}"], []
        if host.startswith("."):
            return [], [FieldError(where, f"Invalid value: {raw!r}: [.domain] is not a next-hop")]
        keys, errors = _hostname(host, where)
        return [f"[{k}]{port}" for k in keys], errors
    m = _PORTED.fullmatch(raw)
    assert m is not None  # the pattern matches any string
    host, port_text = m.group(1), m.group(2)
    if port_text is not None and host.startswith("."):
        return [], [FieldError(where, f"Invalid value: {raw!r}: .domain takes no port")]
    port, errors = _port(port_text, where)
    if errors:
        return [], errors
    dot = "." if host.startswith(".") else ""
    keys, errors = _hostname(host[len(dot):], where)
    return [f"{dot}{k}{port}" for k in keys], errors


# ------------------------------------------------------------------------- value


def render_value(spec: Mapping[str, Any]) -> str:
    """The table value: ``LEVEL [attr=value ...]``, attributes in a fixed order.

    Separators follow Postfix: name patterns joined with ``:``, fingerprints
    with ``|``, exclusions and protocols with ``:``, one ``tafile=`` per file.
    """
    level = spec["level"]
    parts = [level]
    if "match" in spec:
        parts.append("match=" + ("|" if level == "fingerprint" else ":").join(spec["match"]))
    if "ciphers" in spec:
        parts.append(f"ciphers={spec['ciphers']}")
    if "protocols" in spec:
        parts.append(f"protocols={spec['protocols']}")
    if "exclude" in spec:
        parts.append("exclude=" + ":".join(spec["exclude"]))
    parts.extend(f"tafile={path}" for path in spec.get("tafile", ()))
    if "servername" in spec:
        parts.append(f"servername={spec['servername']}")
    if "connectionReuse" in spec:
        parts.append("connection_reuse=" + ("yes" if spec["connectionReuse"] else "no"))
    if "enableRPK" in spec:  # Postfix 3.9+: versions.py holds it back from older ones
        parts.append("enable_rpk=" + ("yes" if spec["enableRPK"] else "no"))
    return " ".join(parts)


def _protocol_errors(protocols: str) -> list[FieldError]:
    seen: set[str] = set()
    for item in protocols.split(":"):
        m = _PROTOCOL.fullmatch(item)
        name = m.group(2) if m else item
        if name in seen:
            return [FieldError("spec.protocols",
                               f"Invalid value: {protocols!r}: {name} is listed twice")]
        seen.add(name)
    return []


def parse_time(text: str) -> datetime:
    """RFC 3339 -> aware datetime (Kubernetes writes ``...Z``)."""
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _exception_errors(spec: Mapping[str, Any], now: datetime | None,
                      max_exception: timedelta) -> list[FieldError]:
    exc = spec.get("exception")
    if exc is None or now is None:
        return []
    expires = parse_time(exc["expiresAt"])
    if expires - now > max_exception:
        days = max_exception.total_seconds() / 86400
        return [FieldError("spec.exception.expiresAt",
                           f"Invalid value: {exc['expiresAt']!r}: an exception may last at most "
                           f"{days:g} days from now")]
    return []


# ------------------------------------------------------------------------ public


def spec_hash(spec: Mapping[str, Any]) -> bytes:
    """Content hash of a spec (16 bytes): the validation cache key across generations."""
    return hashlib.blake2b(json.dumps(spec, sort_keys=True, ensure_ascii=False,
                                      separators=(",", ":")).encode(), digest_size=16).digest()


def validate_object(obj: Mapping[str, Any], *, now: datetime | None = None,
                    max_exception: timedelta = DEFAULT_MAX_EXCEPTION) -> list[FieldError]:
    """Every reason to refuse ``obj``: the CRD's schema and CEL, then the model's own rules.

    ``now`` enables the exception-window check (the operator and the CLI pass
    the current time; leaving it out checks only what is time-independent).
    """
    try:
        load_policy(obj, now=now, max_exception=max_exception)
    except PolicyInvalid as exc:
        return exc.errors
    return []


_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _meta_errors(meta: Mapping[str, Any]) -> list[FieldError]:
    """Names the API server would refuse (RFC 1123 subdomain / label), so an offline
    check never prints a name that could not exist, nor one with a newline in it."""
    out = []
    for attr, pattern, limit in (("name", _SUBDOMAIN, 253), ("namespace", _LABEL, 63)):
        value = meta.get(attr)
        if value is None or value == "":
            continue
        if not isinstance(value, str) or not pattern.fullmatch(value) or len(value) > limit:
            out.append(FieldError(f"metadata.{attr}", f"Invalid value: {shown(str(value))}: "
                                  f"must be a lowercase RFC 1123 "
                                  f"{'subdomain' if limit == 253 else 'label'}"))
    return out


def load_policy(obj: Mapping[str, Any], *, now: datetime | None = None,
                max_exception: timedelta = DEFAULT_MAX_EXCEPTION) -> Policy:
    """A MailTLSPolicy object (dict as the API returns it) -> a valid :class:`Policy`.

    Raises :class:`PolicyInvalid` with every error found.
    """
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        meta = {}
    ref = one_line(f"{meta.get('namespace', 'default')}/{meta.get('name', '?')}")
    errors = validate_with_crd(obj)
    if not isinstance(meta.get("name"), str) or not meta.get("name"):
        errors.insert(0, FieldError("metadata.name", "Required value"))
    errors[:0] = _meta_errors(meta)
    if errors:
        raise PolicyInvalid(ref, errors)
    spec: Mapping[str, Any] = obj["spec"]

    keys: list[str] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(spec["destinations"]):
        where = f"spec.destinations[{i}]"
        dest_keys, dest_errors = normalise_destination(raw, where)
        errors.extend(dest_errors)
        for key in dest_keys:
            if key in seen:
                errors.append(FieldError(where, f"Duplicate value: {raw!r} is the same key "
                                                f"as spec.destinations[{seen[key]}] ({key})"))
                continue
            seen[key] = i
            keys.append(key)
    if "protocols" in spec:
        errors.extend(_protocol_errors(spec["protocols"]))
    errors.extend(_exception_errors(spec, now, max_exception))
    if errors:
        raise PolicyInvalid(ref, errors)

    exc = spec.get("exception")
    created = meta.get("creationTimestamp")
    route = spec.get("route")
    return Policy(
        namespace=sys.intern(meta.get("namespace", "default")),
        name=meta.get("name", "?"),
        level=sys.intern(spec["level"]),
        keys=tuple(keys),
        value=sys.intern(render_value(spec)),
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation") or 0),
        created=parse_time(created) if created else datetime(1970, 1, 1, tzinfo=UTC),
        route=sys.intern(route) if route is not None else None,
        instances=tuple(sys.intern(i) for i in spec.get("instances", ())),
        mode=sys.intern(spec.get("mode", "enforce")),
        exception=Exception_(parse_time(exc["startsAt"]), parse_time(exc["expiresAt"]),
                             exc["reason"]) if exc else None,
        tafile=tuple(spec.get("tafile", ())),
    )
