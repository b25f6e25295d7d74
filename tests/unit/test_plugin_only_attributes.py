"""The attributes only a policy plugin may return (TLSRPT's ``policy_type``, ``policy_domain``,
``policy_string``, ``mx_host_pattern``, ``policy_failure``, ``policy_ttl``) cannot get into a
static policy: the CRD has no field for them, and no string field lets one be appended to a
line (Postfix 3.10 defers a static line carrying them, 3.7 calls them invalid attribute
names: measured in tests/postfix/test_version_gates.py)."""

from __future__ import annotations

from typing import Any

import pytest

from mailtls_operator.policy import PolicyInvalid, load_policy

PLUGIN_ONLY = ("policy_type", "policy_domain", "policy_string", "mx_host_pattern",
               "policy_failure", "policy_ttl")
DIGEST = ":".join(["AB"] * 32)


def load(**spec: Any) -> str:
    obj = {"metadata": {"name": "p", "namespace": "mail"},
           "spec": {"destinations": ["a.example"], **spec}}
    return load_policy(obj).value


@pytest.mark.parametrize("attr", PLUGIN_ONLY)
@pytest.mark.parametrize(("field", "spec"), [
    ("servername", {"level": "encrypt", "servername": "hostname {}=x"}),
    ("protocols", {"level": "encrypt", "protocols": ">=TLSv1.2 {}=x"}),
    ("exclude", {"level": "encrypt", "exclude": ["3DES {}=x"]}),
    ("tafile", {"level": "secure", "tafile": ["/ca.pem {}=x"]}),
    ("match", {"level": "secure", "match": ["mx.example {}=x"]}),
    ("fingerprint", {"level": "fingerprint", "match": [DIGEST + " {}=x"]}),
    ("destination", {"level": "encrypt", "destinations": ["a.example {}=x"]}),
])
def test_no_string_field_smuggles_a_plugin_only_attribute(
        attr: str, field: str, spec: dict[str, Any]) -> None:
    text = {k: (v.format(attr) if isinstance(v, str) else
                [i.format(attr) for i in v] if isinstance(v, list) else v)
            for k, v in spec.items()}
    with pytest.raises(PolicyInvalid):
        load(**text)


@pytest.mark.parametrize("name", ["policyType", "policy_type", "policyTtl", "policyDomain",
                                  "mxHostPattern", "policyString", "policyFailure"])
def test_the_crd_has_no_field_for_them(name: str) -> None:
    with pytest.raises(PolicyInvalid, match=f'unknown field "{name}"'):
        load(level="encrypt", **{name: "sts"})
