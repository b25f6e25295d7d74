"""The instance facts (one ``postconf -x`` in the pod) on Postfix 3.7 and 3.10, and the
deprecated TLS parameters they reveal: what the lint warns about is what 3.10 warns about."""

from __future__ import annotations

import pytest

from mailtls_operator import facts, postfix
from mailtls_operator.versions import DEPRECATED_TLS_PARAMS, deprecated_settings
from testbed import LocalPodRunner

from .conftest import BOTH_VERSIONS, PodFactory

pytestmark = [pytest.mark.postfix, BOTH_VERSIONS]


async def test_facts_carry_the_version_routing_and_client_defaults(
        runner: LocalPodRunner, make_pod: PodFactory, postfix_version: str) -> None:
    pod, inst = make_pod("relay-0", relayhost="[relay.mailtls.test]:587")
    found = await facts.read_facts(runner, pod)
    assert found.values["mail_version"].startswith(postfix_version + ".")
    assert found.values["smtp_tls_policy_maps"] == inst.tls_policy_map
    assert found.routing.relayhost == "[relay.mailtls.test]:587"
    assert found.client.dns_support_level == "disabled"
    assert deprecated_settings(found.values) == []


async def test_deprecated_tls_parameters_are_linted_as_postfix_310_warns(
        runner: LocalPodRunner, make_pod: PodFactory, postfix_version: str) -> None:
    pod, _ = make_pod("relay-0", extra_main_cf={
        "smtp_use_tls": "yes", "smtp_enforce_tls": "yes",
        "smtp_tls_per_site": "hash:/nonexistent/per_site"})
    found = await facts.read_facts(runner, pod)
    linted = deprecated_settings(found.values)
    assert [m.split()[2] for m in linted] == list(DEPRECATED_TLS_PARAMS)
    res = await runner.run(pod, postfix.postconf_get(["mail_version"]), timeout=10)
    said = res.stderr.decode()
    for name, instead in DEPRECATED_TLS_PARAMS.items():
        warning = f'support for parameter "{name}" will be removed; instead, specify "{instead}"'
        assert (warning in said) == (postfix_version == "3.10"), said


async def test_facts_say_whether_this_postfix_has_tlsrpt_and_whether_it_is_on(
        runner: LocalPodRunner, make_pod: PodFactory, postfix_version: str) -> None:
    """3.7 does not know ``smtp_tlsrpt_enable`` (``postconf -x`` leaves it out); 3.10 has it,
    off by default: what the TLSRPT lint and the agent's socket are decided on."""
    pod, inst = make_pod("relay-0")
    found = await facts.read_facts(runner, pod)
    if postfix_version == "3.7":
        assert "smtp_tlsrpt_enable" not in found.values
    else:
        assert found.values["smtp_tlsrpt_enable"] == "no"
        assert found.values["smtp_tlsrpt_socket_name"] == ""
    assert found.values["queue_directory"] == str(inst.queue_dir)
