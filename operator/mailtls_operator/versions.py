"""Which Postfix version parses a policy-table line: attributes against ``mail_version``.

Pure (plus one thin reader at the end).  Postfix reports an attribute it does
not know only when a message is delivered -- and then defers every message to
that destination ("invalid attribute name").  Policy resolvers hit exactly
that when they return ``servername`` or TLSRPT's ``policy_type`` to an older
Postfix.  So the operator reads each instance's ``mail_version`` and holds a
line back from an instance that cannot parse it (``UnsupportedAttribute``);
the rest of the table rolls out.

Minimum versions, from postconf(5) ``smtp_tls_policy_maps`` and the
parameters each attribute overrides:

=====================  =======  ===========================================
level / attribute      Postfix  source
=====================  =======  ===========================================
none may encrypt        2.3     smtp_tls_policy_maps ("2.3 and later")
verify secure match     2.3
ciphers protocols       2.3     (ciphers/protocols/exclude at ``may``: 2.6)
fingerprint             2.5
exclude                 2.6
dane dane-only          2.11    RFC 7672 support
tafile                  2.11    smtp_tls_trust_anchor_file
servername              3.4     smtp_tls_servername
connection_reuse        3.4     smtp_tls_connection_reuse
protocols=>=TLSv1.2     3.6     the ">=" range syntax of smtp_tls_protocols
enable_rpk              3.9     smtp_tls_enable_rpk
policy_type, ...        3.10    TLSRPT attributes (policy_type, policy_domain,
                                mx_host_pattern, policy_string, policy_failure,
                                policy_ttl); 3.10 takes them only together
                                with policy_type (a policy plugin's answer)
=====================  =======  ===========================================

Measured against Debian's 3.7.11 and 3.10.13 by
``tests/postfix/test_version_gates.py``: below its version each attribute is
logged as ``invalid attribute name`` and the mail deferred.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Protocol

Version = tuple[int, ...]

LEVEL_MIN: dict[str, Version] = {
    "none": (2, 3), "may": (2, 3), "encrypt": (2, 3), "verify": (2, 3), "secure": (2, 3),
    "fingerprint": (2, 5), "dane": (2, 11), "dane-only": (2, 11),
}
ATTRIBUTE_MIN: dict[str, Version] = {
    "match": (2, 3), "ciphers": (2, 3), "protocols": (2, 3), "exclude": (2, 6),
    "tafile": (2, 11), "servername": (3, 4), "connection_reuse": (3, 4),
    "enable_rpk": (3, 9), "policy_type": (3, 10), "policy_domain": (3, 10),
    "mx_host_pattern": (3, 10), "policy_string": (3, 10), "policy_failure": (3, 10),
    "policy_ttl": (3, 10),
}
RANGE_SYNTAX_MIN: Version = (3, 6)
"""``protocols=>=TLSv1.2`` (and ``<=``): the range form of Postfix 3.6."""

REASON = "UnsupportedAttribute"
DEPRECATED_REASON = "DeprecatedParameter"  # status.DEPRECATED_PARAMETER: a note in RolledOut

DEPRECATED_TLS_PARAMS: dict[str, str] = {
    "smtp_use_tls": "smtp_tls_security_level",
    "smtp_enforce_tls": "smtp_tls_security_level",
    "smtp_tls_per_site": "smtp_tls_policy_maps",
}
"""smtp(8) TLS parameters Postfix 3.10 warns about ("support for parameter ... will be
removed; instead, specify ..."; 3.7 does not): set, they still change the client's TLS."""

LINT_PARAMS: tuple[str, ...] = ("mail_version", *DEPRECATED_TLS_PARAMS)
"""What the version lint reads from an instance (``postconf -x``; in the agent's report)."""


def parse_version(text: str) -> Version | None:
    """``3.7.11`` -> (3, 7, 11); a snapshot ``3.10-20250117`` -> (3, 10); junk -> None."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if m is None:
        return None
    return tuple(int(g) for g in m.groups() if g is not None)


def _show(version: Version) -> str:
    return ".".join(str(n) for n in version)


def unsupported(value: str, version: Version) -> list[str]:
    """What in the table value ``LEVEL [attr=value ...]`` the given Postfix cannot parse."""
    words = value.split()
    if not words:
        return []
    out: list[str] = []
    level = words[0].lower()
    need = LEVEL_MIN.get(level)
    if need is not None and version < need:
        out.append(f"level {level} needs Postfix {_show(need)}")
    for word in words[1:]:
        name, _, attr_value = word.partition("=")
        need = ATTRIBUTE_MIN.get(name)
        if need is not None and version < need:
            out.append(f"{name} needs Postfix {_show(need)}")
        elif name == "protocols" and re.search(r"(^|:)[<>]=", attr_value) \
                and version < RANGE_SYNTAX_MIN:
            out.append(f"protocols={attr_value} (range syntax) needs Postfix "
                       f"{_show(RANGE_SYNTAX_MIN)}")
    return out


class _Valued(Protocol):
    @property
    def ref(self) -> str: ...
    @property
    def value(self) -> str: ...


def held_back(policies: Iterable[_Valued], mail_version: str, instance: str
              ) -> dict[str, str]:
    """ref -> message for every policy whose line this ``mail_version`` cannot parse.

    An unreadable version holds nothing back (the lint must never stop a rollout).
    """
    version = parse_version(mail_version)
    if version is None:
        return {}
    out: dict[str, str] = {}
    for p in policies:
        problems = unsupported(p.value, version)
        if problems:
            out[p.ref] = (f"{'; '.join(problems)}, {instance} runs {mail_version}: this "
                          f"policy's lines are held back from {instance} (Postfix would "
                          "defer every message to them)")
    return out


def deprecated_settings(values: Mapping[str, str]) -> list[str]:
    """One message per deprecated TLS parameter the instance's main.cf turns on."""
    out = []
    for name, instead in DEPRECATED_TLS_PARAMS.items():
        value = values.get(name, "").strip()
        if value and value.lower() not in ("no", "false", "0"):
            out.append(f"main.cf sets {name} = {value}: Postfix 3.10 warns that support for "
                       f"it will be removed; specify {instead} instead")
    return out
