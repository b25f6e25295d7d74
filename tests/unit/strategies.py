"""Hypothesis strategies for MailTLSPolicy specs: plausible, hostile, and in between."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from mailtls_operator.policy import LEVELS

HOSTILE_CHARS = " \t\n\r\x00\x0b\x0c\x7f#=,:;|[]/@\"'\\\u2028\u0085\u00a0"
label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
domain = st.lists(label, min_size=1, max_size=4).map(".".join)
idn = st.sampled_from(["bücher.example", "BÜCHER.Example", "xn--bcher-kva.example",
                       "пример.испытание", "例え.テスト", "straße.example"])
hostile = st.text(alphabet=st.sampled_from(HOSTILE_CHARS) | st.characters(), max_size=30)
destination = st.one_of(
    domain,
    domain.map(lambda d: "." + d),
    domain.map(lambda d: f"[{d}]"),
    st.tuples(domain, st.integers(1, 65535)).map(lambda t: f"[{t[0]}]:{t[1]}"),
    st.tuples(domain, st.integers(0, 99999)).map(lambda t: f"{t[0]}:{t[1]}"),
    st.ip_addresses(v=4).map(lambda a: f"[{a}]"),
    st.ip_addresses(v=6).map(lambda a: f"[ipv6:{a}]:25"),
    idn,
    hostile,
    st.tuples(domain, hostile).map("".join),
)
name_pattern = st.one_of(st.sampled_from(["nexthop", "dot-nexthop", "hostname"]), domain,
                         domain.map(lambda d: "." + d), hostile)
digest = st.lists(st.from_regex(r"[0-9A-F]{2}", fullmatch=True), min_size=16, max_size=32
                  ).map(":".join)
path = st.one_of(st.from_regex(r"/[a-z0-9._-]{1,12}(/[a-z0-9._-]{1,12}){0,3}", fullmatch=True),
                 hostile)


@st.composite
def specs(draw: st.DrawFn, hostile_ok: bool = True) -> dict[str, Any]:
    """A spec with any mix of fields, each either plausible or hostile."""
    spec: dict[str, Any] = {
        "destinations": draw(st.lists(destination, min_size=1, max_size=4)),
        "level": draw(st.sampled_from(LEVELS) | (hostile if hostile_ok else st.nothing())),
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        "match": st.lists(name_pattern | digest, min_size=1, max_size=3),
        "ciphers": st.sampled_from(["export", "low", "medium", "high", "null"]) | hostile,
        "protocols": st.sampled_from([">=TLSv1.2", "!SSLv2:!SSLv3", "TLSv1.3",
                                      ">=TLSv1.2:>=TLSv1.3"]) | hostile,
        "exclude": st.lists(st.sampled_from(["3DES", "aNULL", "RC4"]) | hostile, min_size=1,
                            max_size=3),
        "tafile": st.lists(path, min_size=1, max_size=2),
        "servername": st.sampled_from(["hostname", "nexthop"]) | domain | hostile,
        "connectionReuse": st.booleans(),
        "route": st.just("direct"),
        "instances": st.lists(st.sampled_from(["relay", "edge"]), max_size=2, unique=True),
        "mode": st.sampled_from(["enforce", "audit"]),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            spec[key] = draw(strategy)
    return spec


@st.composite
def schema_valid_specs(draw: st.DrawFn) -> dict[str, Any]:
    """Specs that pass the OpenAPI schema, so every CEL rule gets evaluated."""
    spec: dict[str, Any] = {
        "destinations": draw(st.lists(st.one_of(domain, domain.map(lambda d: "." + d),
                                                domain.map(lambda d: f"[{d}]:25")),
                                      min_size=1, max_size=3, unique=True)),
        "level": draw(st.sampled_from(LEVELS)),
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        "match": st.lists(st.sampled_from(["nexthop", "dot-nexthop"]) | digest, min_size=1,
                          max_size=3),
        "ciphers": st.sampled_from(["low", "high"]),
        "protocols": st.just(">=TLSv1.2"),
        "exclude": st.just(["3DES"]),
        "tafile": st.just(["/etc/ca.pem"]),
        "servername": st.just("hostname"),
        "connectionReuse": st.booleans(),
        "route": st.just("direct"),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            spec[key] = draw(strategy)
    return spec
