"""Every invalid policy of the corpus is refused twice, with the same field and reason:
by the CRD evaluated as the API server would (schema + cel-python), and by the model."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailtls_operator.crd import validate_with_crd
from mailtls_operator.loader import decode
from mailtls_operator.policy import validate_object

CORPUS = decode((Path(__file__).parents[1] / "corpus" / "invalid.yaml").read_bytes())[0]
NOW = datetime(2026, 11, 25, tzinfo=UTC)


def _obj(spec: Any) -> dict[str, Any]:
    return {"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy",
            "metadata": {"name": "bad", "namespace": "mail"}, "spec": spec}


def test_corpus_has_at_least_forty_cases() -> None:
    assert len(CORPUS) >= 40
    assert len({c["name"] for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("case", CORPUS, ids=[c["name"] for c in CORPUS])
def test_crd_refuses_with_field_and_reason(case: dict[str, Any]) -> None:
    errors = validate_with_crd(_obj(case["spec"]), oracle=True)
    assert any(e.field == case["field"] and case["reason"] in e.message for e in errors), errors


@pytest.mark.parametrize("case", CORPUS, ids=[c["name"] for c in CORPUS])
def test_model_refuses_with_field_and_reason(case: dict[str, Any]) -> None:
    errors = validate_object(_obj(case["spec"]), now=NOW)
    assert any(e.field == case["field"] and case["reason"] in e.message for e in errors), errors


MODEL_ONLY = [
    ("idna-bad-punycode", {"destinations": ["xn--zz-.example"]}, "spec.destinations[0]",
     "not a valid host name"),
    ("line-separator", {"destinations": ["a\u2028b.example"]}, "spec.destinations[0]",
     "contains U+2028"),
    ("idna-disallowed", {"destinations": ["a\u2615b.example"]}, "spec.destinations[0]",
     "not a valid host name"),
    ("empty-label", {"destinations": ["a..example"]}, "spec.destinations[0]", "host name"),
    ("leading-hyphen", {"destinations": ["-a.example"]}, "spec.destinations[0]", "host name"),
    ("duplicate-after-normalisation", {"destinations": ["A.example", "a.example."]},
     "spec.destinations[1]", "Duplicate value"),
    ("duplicate-alabel-ulabel", {"destinations": ["bücher.example", "xn--bcher-kva.example"]},
     "spec.destinations[1]", "Duplicate value"),
    ("port-zero", {"destinations": ["[a.example]:0"]}, "spec.destinations[0]", "1-65535"),
    ("port-too-big", {"destinations": ["a.example:70000"]}, "spec.destinations[0]", "1-65535"),
    ("bad-ipv4", {"destinations": ["[999.1.1.1]"]}, "spec.destinations[0]", "IPv4"),
    ("bad-ipv6", {"destinations": ["[ipv6:1:2:3:4:5:6:7:8:9]"]}, "spec.destinations[0]", "IPv6"),
    ("dot-domain-port", {"destinations": [".a.example:25"]}, "spec.destinations[0]", "no port"),
    ("protocol-twice", {"destinations": ["a.example"], "protocols": ">=TLSv1.2:!TLSv1.2"},
     "spec.protocols", "listed twice"),
    ("exception-too-long", {"destinations": ["a.example"],
                            "exception": {"startsAt": "2027-05-20T00:00:00Z",
                                          "expiresAt": "2027-06-01T00:00:00Z",
                                          "reason": "partner certificate broke"}},
     "spec.exception.expiresAt", "at most 30 days"),
]


@pytest.mark.parametrize(("name", "spec", "field", "reason"), MODEL_ONLY,
                         ids=[m[0] for m in MODEL_ONLY])
def test_model_refuses_what_no_schema_can_express(name: str, spec: dict[str, Any], field: str,
                                                  reason: str) -> None:
    errors = validate_object(_obj({"level": "encrypt", **spec}), now=NOW)
    assert any(e.field == field and reason in e.message for e in errors), errors
