"""The model: keys are normalised as Postfix looks them up, values in Postfix's syntax."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from mailtls_operator.policy import PolicyInvalid, load_policy, normalise_destination


def obj(spec: dict[str, Any], name: str = "p", namespace: str = "mail",
        created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": created,
                         "uid": f"uid-{name}", "generation": 1},
            "spec": spec}


@pytest.mark.parametrize(("raw", "keys"), [
    ("Example.COM", ["example.com"]),
    ("example.com.", ["example.com"]),
    (".Example.com", [".example.com"]),
    ("[MX.Example.com]:25", ["[mx.example.com]:25"]),
    ("[192.0.2.1]", ["[192.0.2.1]"]),
    ("[IPv6:2001:DB8:0:0::1]:587", ["[ipv6:2001:db8::1]:587"]),
    ("example.com:587", ["example.com:587"]),
    ("bücher.example", ["xn--bcher-kva.example", "bücher.example"]),
    ("BÜCHER.example.", ["xn--bcher-kva.example", "bücher.example"]),
    ("xn--bcher-kva.example", ["xn--bcher-kva.example", "bücher.example"]),
    (".bücher.example", [".xn--bcher-kva.example", ".bücher.example"]),
    ("[bücher.example]:25", ["[xn--bcher-kva.example]:25", "[bücher.example]:25"]),
])
def test_destination_keys_are_normalised(raw: str, keys: list[str]) -> None:
    got, errors = normalise_destination(raw, "spec.destinations[0]")
    assert errors == []
    assert got == keys


def test_unicode_key_is_nfc() -> None:
    decomposed = "bu\u0308cher.example"  # u + combining diaeresis
    keys, errors = normalise_destination(decomposed, "d")
    assert errors == [] and keys == ["xn--bcher-kva.example", "bücher.example"]


@pytest.mark.parametrize(("spec", "value"), [
    ({"level": "none"}, "none"),
    ({"level": "may", "protocols": "!SSLv2:!SSLv3"}, "may protocols=!SSLv2:!SSLv3"),
    ({"level": "encrypt", "ciphers": "high", "exclude": ["3DES", "aNULL"]},
     "encrypt ciphers=high exclude=3DES:aNULL"),
    ({"level": "secure", "match": ["nexthop", "dot-nexthop"], "tafile": ["/a.pem", "/b.pem"]},
     "secure match=nexthop:dot-nexthop tafile=/a.pem tafile=/b.pem"),
    ({"level": "fingerprint", "match": ["AA:" * 15 + "AA", "BB:" * 15 + "BB"]},
     "fingerprint match=" + "AA:" * 15 + "AA|" + "BB:" * 15 + "BB"),
    ({"level": "dane-only", "connectionReuse": False}, "dane-only connection_reuse=no"),
    ({"level": "verify", "match": ["hostname"], "servername": "nexthop"},
     "verify match=hostname servername=nexthop"),
])
def test_value_uses_postfix_syntax(spec: dict[str, Any], value: str) -> None:
    policy = load_policy(obj({"destinations": ["a.example"], **spec}))
    assert policy.value == value


def test_every_error_is_reported_at_once() -> None:
    with pytest.raises(PolicyInvalid) as info:
        load_policy(obj({"destinations": ["a..example", "b.example:0"], "level": "encrypt"}))
    assert [e.field for e in info.value.errors] == ["spec.destinations[0]",
                                                   "spec.destinations[1]"]


def test_exception_within_window_is_accepted() -> None:
    now = datetime(2026, 11, 25, tzinfo=UTC)
    policy = load_policy(obj({"destinations": ["a.example"], "level": "may",
                              "exception": {"startsAt": "2026-11-20T00:00:00Z",
                                      "expiresAt": "2026-12-01T00:00:00Z",
                                            "reason": "INC-42 partner cert expired"}}), now=now)
    assert policy.exception is not None
    assert policy.exception.expires_at == datetime(2026, 12, 1, tzinfo=UTC)
    assert not policy.is_expired(now)
    assert policy.is_expired(datetime(2026, 12, 1, tzinfo=UTC))


def test_missing_name_is_refused() -> None:
    with pytest.raises(PolicyInvalid) as info:
        load_policy({"spec": {"destinations": ["a.example"], "level": "may"}})
    assert info.value.errors[0].field == "metadata.name"
