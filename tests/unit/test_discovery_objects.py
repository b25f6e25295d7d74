"""MailTLSDiscovery objects are judged like MailTLSPolicy ones: with the API server's RE2
semantics for the CRD's patterns (no ``$`` before a final newline)."""

from __future__ import annotations

import pytest

from mailtls_operator.discovery.objects import DiscoveryInvalid, load_discovery


def _obj(domains: list[str]) -> dict[str, object]:
    return {"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSDiscovery",
            "metadata": {"name": "partners", "namespace": "mail"},
            "spec": {"domains": domains, "sources": ["mta-sts"]}}


def test_a_plain_domain_is_accepted() -> None:
    assert load_discovery(_obj(["partner.example"])).domains == ("partner.example",)


@pytest.mark.parametrize("domain", ["partner.example\n", "partner.example\n.evil", "\tx.example"])
def test_a_domain_with_a_newline_or_tab_is_refused(domain: str) -> None:
    with pytest.raises(DiscoveryInvalid):
        load_discovery(_obj([domain]))
