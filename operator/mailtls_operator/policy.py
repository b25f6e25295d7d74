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

from .crd import FieldError, prune_nulls, validate_with_crd
from .crd.meta import created_of, generation_of, meta_errors, metadata_of, name_of, namespace_of
from .crd.timefmt import parse_rfc3339
from .keys import deleted_by_mapping, lookup_key, unknown_character, with_dots
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
    """A host or domain name -> its keys: one for ASCII, A-label + U-label for IDN.

    ``raw`` has only ``.`` as full stop (:func:`.keys.with_dots`).  A character
    IDNA mapping deletes is refused, never dropped: ``bank.example<filler>x``
    would otherwise become the key of a different name, ``bank.examplex``.
    """
    name = raw[:-1] if raw.endswith(".") else raw
    if not name:
        return [], [FieldError(where, "Invalid value: empty host name")]
    ascii_only = name.isascii()
    if not ascii_only:
        deleted = deleted_by_mapping(name)
        if deleted is not None:
            return [], [FieldError(where, f"Invalid value: {shown(raw)}: contains {deleted}, "
                                          "which IDNA mapping deletes (the key would name "
                                          "another host)")]
        unknown = unknown_character(name)
        if unknown is not None:
            return [], [FieldError(where, f"Invalid value: {shown(raw)}: contains {unknown}, "
                                          "unassigned in this Unicode version (how Postfix "
                                          "folds it cannot be told)")]
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
    if "" in alabel.split("."):  # "a..b", "name.." : Postfix never looks such a key up
        return [], [FieldError(where, f"Invalid value: {shown(raw)}: has an empty label")]
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

    The IDNA full stops (:data:`.keys.FULL_STOPS`) separate labels like ``.``, wherever
    written.

    Forms (postconf(5) smtp_tls_policy_maps): ``domain``, ``.domain``,
    ``domain:port``, ``[host]``, ``[host]:port``, ``[ipv4]``, ``[ipv6:addr]``.
    Whitespace, control and format characters are refused first, whatever the
    CRD's pattern let through (it admits any non-ASCII character, for IDN).
    """
    bad = unsafe_character(raw)
    if bad is not None:
        return [], [FieldError(where, f"Invalid value: {shown(raw)}: contains {bad}, a space, "
                                      "control or format character")]
    text = with_dots(raw)  # IDNA full stops are label separators; a trailing one goes
    bracket = _BRACKET.fullmatch(text)
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
    m = _PORTED.fullmatch(text)
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
    """RFC 3339, as far as the API server accepts it -> an aware UTC datetime; only
    :class:`ValueError` (with the reason) otherwise, never an OverflowError."""
    return parse_rfc3339(text)


def _exception_errors(spec: Mapping[str, Any], now: datetime | None,
                      max_exception: timedelta) -> list[FieldError]:
    exc = spec.get("exception")
    if exc is None or now is None:
        return []
    try:
        expires = parse_time(exc["expiresAt"])
    except ValueError as err:  # the CEL rule refused it first; kept total regardless
        return [FieldError("spec.exception.expiresAt", f"Invalid value: {err}")]
    if expires - now > max_exception:  # a difference: never past datetime.max
        days = max_exception.total_seconds() / 86400
        return [FieldError("spec.exception.expiresAt",
                           f"Invalid value: {exc['expiresAt']!r}: an exception may last at most "
                           f"{days:g} days from now")]
    return []


# ------------------------------------------------------------------------ public


def spec_hash(spec: Any) -> bytes:
    """Content hash of a spec (16 bytes): the validation cache key across generations.

    Total over anything: a value JSON cannot write (an integer past Python's 4,300-digit
    limit, NaN, a non-string key, nesting past the recursion limit) hashes its
    ``repr`` of types and hex digits instead (:func:`_shape`)."""
    try:
        text = json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        text = "\0" + _shape(spec, 0)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _shape(value: Any, depth: int) -> str:
    """A deterministic text for any JSON-ish value, bounded in depth (hex for integers)."""
    if depth > 64:
        return "..."
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{_shape(k, depth + 1)}:{_shape(v, depth + 1)}"
                              for k, v in sorted(value.items(), key=lambda kv: repr(type(
                                  kv[0])) + (kv[0] if isinstance(kv[0], str) else ""))) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_shape(v, depth + 1) for v in value) + "]"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"int:{value:x}"
    if isinstance(value, str):
        return "str:" + value
    return f"{type(value).__name__}:{value!r}"


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


def load_policy(obj: Mapping[str, Any], *, now: datetime | None = None,
                max_exception: timedelta = DEFAULT_MAX_EXCEPTION) -> Policy:
    """A MailTLSPolicy object (dict as the API returns it) -> a valid :class:`Policy`.

    Raises :class:`PolicyInvalid` with every error found.
    """
    obj = prune_nulls(obj)  # as the API server does before it validates
    meta = metadata_of(obj)
    ref = one_line(f"{namespace_of(meta)}/{name_of(meta)}")
    errors = meta_errors(obj) + validate_with_crd(obj)
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
            # judged as Postfix folds keys with smtputf8_enable = yes: the wider folding
            folded = lookup_key(key, smtputf8=True)
            if folded in seen:
                errors.append(FieldError(where, f"Duplicate value: {raw!r} is the same key "
                                                f"as spec.destinations[{seen[folded]}] "
                                                f"({folded}, as Postfix looks it up)"))
                continue
            seen[folded] = i
            keys.append(key)
    if "protocols" in spec:
        errors.extend(_protocol_errors(spec["protocols"]))
    errors.extend(_exception_errors(spec, now, max_exception))
    if errors:
        raise PolicyInvalid(ref, errors)

    exc = spec.get("exception")
    route = spec.get("route")
    return Policy(
        namespace=sys.intern(namespace_of(meta)),
        name=name_of(meta),
        level=sys.intern(spec["level"]),
        keys=tuple(keys),
        value=sys.intern(render_value(spec)),
        uid=meta.get("uid") or "",
        generation=generation_of(meta),
        created=created_of(meta),
        route=sys.intern(route) if route is not None else None,
        instances=tuple(sys.intern(i) for i in spec.get("instances", ())),
        mode=sys.intern(spec.get("mode", "enforce")),
        exception=Exception_(parse_time(exc["startsAt"]), parse_time(exc["expiresAt"]),
                             exc["reason"]) if exc else None,
        tafile=tuple(spec.get("tafile", ())),
    )
