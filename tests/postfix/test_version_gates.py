"""``versions.py`` checked against the real binaries: per policy attribute, Postfix 3.7 and 3.10.

One instance per Postfix version gets a table with one destination per
attribute (each line valid but for the attribute's name being known), and one
message per destination goes to a STARTTLS sink.  A Postfix that does not know
an attribute logs ``next-hop destination "D": invalid attribute name: "A"``
and defers the mail ("client TLS configuration problem"); the test asserts,
per attribute and version, that this happens exactly when
:data:`~mailtls_operator.versions.ATTRIBUTE_MIN` says the version is too old.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailtls_operator.versions import ATTRIBUTE_MIN, RANGE_SYNTAX_MIN, parse_version
from testbed import InstanceSettings, LocalInstance, postfix_unavailable, starttls_sink
from testbed.postfixroot import VERSIONS

pytestmark = pytest.mark.postfix

LINES: dict[str, str] = {
    "match": "verify match=nomatch.mailtls.test",
    "ciphers": "encrypt ciphers=high",
    "protocols": "encrypt protocols=!SSLv2:!SSLv3",
    "exclude": "encrypt exclude=3DES",
    "tafile": "secure match=sink.mailtls.test tafile=/nonexistent/ca.pem",
    "servername": "encrypt servername=hostname",
    "connection_reuse": "encrypt connection_reuse=yes",
    "enable_rpk": "encrypt enable_rpk=yes",
    "policy_type": "encrypt policy_type=sts policy_domain=policy-type.test",
    # Postfix names the first unknown attribute: the one under test comes first.
    "policy_domain": "encrypt policy_domain=policy-domain.test policy_type=sts",
    "mx_host_pattern": "encrypt mx_host_pattern=*.mx-host-pattern.test policy_type=sts",
    "policy_string": "encrypt policy_string=version:STSv1 policy_type=sts",
    "policy_failure": "encrypt policy_failure=sts-webpki-invalid policy_type=sts",
    "policy_ttl": "encrypt policy_ttl=60 policy_type=sts",
    "protocols-range": "encrypt protocols=>=TLSv1.2",
    "static-policy-ttl": "encrypt policy_ttl=60",
}
"""One table value per attribute; the attribute is the only thing an old Postfix may not know."""

EXTRA = {"protocols-range", "static-policy-ttl"}
"""Lines that check something besides an attribute's name."""

INVALID = re.compile(r'next-hop destination "(?P<dest>[^"]+)": invalid attribute name: '
                     r'"(?P<attr>[^"]+)"')


def domain(attr: str) -> str:
    return attr.replace("_", "-") + ".test"


@dataclass(frozen=True)
class Outcome:
    mail_version: str
    invalid: dict[str, str]  # destination -> the attribute Postfix called invalid
    status: dict[str, str]  # attribute -> sent | deferred
    maillog: str


@pytest.fixture(scope="module", params=VERSIONS)
def outcome(request: pytest.FixtureRequest) -> Iterator[Outcome]:
    """Every line of :data:`LINES` delivered once through one instance of the version."""
    version: str = request.param
    reason = postfix_unavailable(version)
    if reason is not None:
        pytest.skip(f"Postfix {version} cannot run here: {reason}")
    base = Path(tempfile.mkdtemp(prefix="mailtls-gates-"))
    base.chmod(0o755)
    sink = starttls_sink(base / "certs", name="gates")
    sink.start()
    hosts = {domain(a): "127.0.0.1" for a in LINES}
    inst = LocalInstance(base / "relay", InstanceSettings(
        name="relay", postfix=version, hosts=hosts, smtp_tcp_port=sink.port))
    inst.create(tls_policy="".join(f"{domain(a)} {v}\n" for a, v in LINES.items()))
    try:
        inst.start()
        qids = {a: inst.submit(f"user@{domain(a)}") for a in LINES}
        status = {a: inst.wait_for_delivery(q, timeout=30).status for a, q in qids.items()}
        log = inst.maillog()
        invalid = {m["dest"]: m["attr"] for m in INVALID.finditer(log)}
        yield Outcome(inst.postconf("mail_version")["mail_version"], invalid, status, log)
    finally:
        inst.stop()
        sink.stop()
        shutil.rmtree(base, ignore_errors=True)
        inst.build.forget(base)


@pytest.mark.parametrize("attr", sorted(set(LINES) - EXTRA))
def test_postfix_refuses_an_attribute_exactly_below_its_version(
        outcome: Outcome, attr: str) -> None:
    version = parse_version(outcome.mail_version)
    assert version is not None
    too_old = version < ATTRIBUTE_MIN[attr]
    refused = outcome.invalid.get(domain(attr))
    if too_old:
        assert refused == attr, (attr, outcome.mail_version, refused)
        assert outcome.status[attr] == "deferred"
    else:
        assert refused is None, (attr, outcome.mail_version, refused)


def test_the_range_syntax_of_protocols_parses_on_both(outcome: Outcome) -> None:
    version = parse_version(outcome.mail_version)
    assert version is not None and version >= RANGE_SYNTAX_MIN
    assert domain("protocols-range") not in outcome.invalid
    assert outcome.status["protocols-range"] == "sent"


def test_every_attribute_of_the_table_is_measured() -> None:
    assert set(ATTRIBUTE_MIN) == set(LINES) - EXTRA


def test_tls_attributes_unknown_to_37_are_delivered_by_310(outcome: Outcome) -> None:
    """The newer attributes do not only parse on 3.10: the mail goes out."""
    if not outcome.mail_version.startswith("3.10"):
        assert outcome.status["enable_rpk"] == "deferred"
        return
    for attr in ("enable_rpk", "connection_reuse", "servername", "policy_type"):
        assert outcome.status[attr] == "sent", (attr, outcome.maillog[-3000:])


def test_plugin_only_attributes_without_policy_type_are_refused_by_310(
        outcome: Outcome) -> None:
    """Postfix 3.10 takes the TLSRPT attributes only with ``policy_type``: in a static
    ("built-in") policy they defer the mail, as an unknown name does on 3.7."""
    assert outcome.status["static-policy-ttl"] == "deferred"
    dest = domain("static-policy-ttl")
    if outcome.mail_version.startswith("3.10"):
        assert f'next-hop destination "{dest}": built-in policy has unexpected attribute' \
            in outcome.maillog
    else:
        assert outcome.invalid[dest] == "policy_ttl"
