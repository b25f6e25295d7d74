"""The policy line a probe checks (level, match, tafile, ...) and the smtp(8) client's
main.cf defaults that posttls-finger does not read by itself.  Pure."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from .. import postfix
from .results import LEVELS

# -- the policy line -----------------------------------------------------------


class PolicyLike(Protocol):
    """What a probe needs of a policy: its level and its table value."""

    @property
    def level(self) -> str: ...
    @property
    def value(self) -> str: ...


@dataclass(frozen=True)
class TableValue:
    """A TLS policy table value (``LEVEL [name=value ...]``), parsed as Postfix reads it."""

    level: str
    match: tuple[str, ...] = ()
    ciphers: str = ""
    protocols: str = ""
    exclude: str = ""
    tafile: tuple[str, ...] = ()
    servername: str = ""
    connection_reuse: str = ""
    enable_rpk: str = ""


_ATTRS: Final = frozenset({"match", "ciphers", "protocols", "exclude", "tafile", "servername",
                           "connection_reuse", "enable_rpk"})


def parse_value(value: str) -> TableValue:
    """Parse a policy value the way smtp(8) does; raise InvalidArgument on what it refuses.

    ``match`` is split on ``:`` (``|`` for ``fingerprint``, whose digests
    contain colons); ``tafile`` may repeat.
    """
    words = value.split()
    if not words:
        raise postfix.InvalidArgument("empty policy value")
    level = words[0].lower()
    if level not in LEVELS:
        raise postfix.InvalidArgument(f"invalid security level {words[0]!r}")
    attrs: dict[str, Any] = {"tafile": []}
    for word in words[1:]:
        name, sep, val = word.partition("=")
        if not sep or name not in _ATTRS or not val:
            raise postfix.InvalidArgument(f"malformed attribute {word!r} in {value!r}")
        if name == "tafile":
            attrs["tafile"].append(val)
        elif name in attrs:
            raise postfix.InvalidArgument(f"attribute {name!r} repeated in {value!r}")
        elif name == "match":
            sep_char = "|" if level == "fingerprint" else ":"
            attrs["match"] = tuple(m for m in val.split(sep_char) if m)
        else:
            attrs[name] = val
    attrs["tafile"] = tuple(attrs["tafile"])
    return TableValue(level=level, **attrs)


def value_of(policy: PolicyLike | TableValue | str) -> TableValue:
    if isinstance(policy, TableValue):
        return policy
    return parse_value(policy if isinstance(policy, str) else policy.value)


# -- the smtp client's defaults --------------------------------------------------


CLIENT_PARAMS: Final = ("smtp_tls_CAfile", "smtp_tls_CApath", "smtp_tls_trust_anchor_file",
                        "smtp_tls_protocols", "smtp_tls_mandatory_protocols",
                        "smtp_tls_ciphers", "smtp_tls_mandatory_ciphers",
                        "smtp_tls_servername", "smtp_dns_support_level")


@dataclass(frozen=True)
class ClientDefaults:
    """main.cf settings of the smtp(8) client that decide a TLS session and that
    ``posttls-finger`` does not apply by itself (``postconf -x`` values).

    Empty strings mean "not set": ``posttls-finger``'s own default applies.
    """

    ca_file: str = ""
    ca_path: str = ""
    trust_anchor_files: tuple[str, ...] = ()
    protocols: str = ""
    mandatory_protocols: str = ""
    ciphers: str = ""
    mandatory_ciphers: str = ""
    servername: str = ""
    dns_support_level: str = ""

    @property
    def dnssec(self) -> bool:
        """Whether the smtp client does DNSSEC lookups (needed by ``dane``/``dane-only``)."""
        return self.dns_support_level.strip().lower() == "dnssec"

    @classmethod
    def from_postconf(cls, values: Mapping[str, str]) -> ClientDefaults:
        return cls(
            ca_file=values.get("smtp_tls_CAfile", ""),
            ca_path=values.get("smtp_tls_CApath", ""),
            trust_anchor_files=tuple(p for p in re.split(r"[\s,]+",
                                                         values.get("smtp_tls_trust_anchor_file",
                                                                    ""))
                                     if p),
            protocols=values.get("smtp_tls_protocols", ""),
            mandatory_protocols=values.get("smtp_tls_mandatory_protocols", ""),
            ciphers=values.get("smtp_tls_ciphers", ""),
            mandatory_ciphers=values.get("smtp_tls_mandatory_ciphers", ""),
            servername=values.get("smtp_tls_servername", ""),
            dns_support_level=values.get("smtp_dns_support_level", ""),
        )
