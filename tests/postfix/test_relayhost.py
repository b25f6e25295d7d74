"""DESIGN.md §5, the relayhost trap: ``bypassed_keys`` agrees with real Postfix.

The instance relays everything to ``relayhost`` (a plain sink).  Domain
next-hops resolve (through the smtp client's own ``/etc/hosts``) to a second
plain sink, so whether a policy key was applied is visible as a real
delivery difference: applied ``encrypt`` defers, a bypassed key lets the
mail go out in clear text.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mailtls_operator.facts import read_instance_config
from mailtls_operator.rollout import PodTarget, roll_out
from mailtls_operator.routing import bypassed_keys, table_problems
from testbed import LocalPodRunner, SmtpSink, plain_sink

from .conftest import BOTH_VERSIONS, PodFactory
from .helpers import policy, tables, target

pytestmark = [pytest.mark.postfix, BOTH_VERSIONS]


async def test_relayhost_trap_matches_real_postfix(
        runner: LocalPodRunner, make_pod: PodFactory, plain: SmtpSink,
        sinks: Callable[[SmtpSink], SmtpSink]) -> None:
    direct = sinks(plain_sink("direct"))
    relay = plain
    pod, inst = make_pod("relay-0", relayhost=relay.nexthop, smtp_tcp_port=direct.port,
                         hosts={"example.org": "127.0.0.1", "other.example": "127.0.0.1"})
    config = await read_instance_config(runner, pod)
    assert config.relayhost == relay.nexthop
    assert config.relay_nexthops == (relay.nexthop,)
    assert config.transport_tables == (inst.transport_map,)
    assert config.smtp_dns_support_level == "disabled"
    assert table_problems(config, target(pod, inst)) == []
    elsewhere = PodTarget(pod, map_path="/var/lib/mailtls/tls_policy")
    [problem] = table_problems(config, elsewhere)
    assert "never reads the table" in problem

    # 1. A domain key, not routed: Postfix never looks it up; mail leaves in clear text.
    unrouted = tables(policy("org", "encrypt", ["example.org"]),
                      policy("ip", "encrypt", [f"[127.0.0.1]:{direct.port}"]))
    assert (await roll_out(runner, [target(pod, inst)], unrouted)).ok
    assert bypassed_keys(unrouted.tls_entries, config, unrouted.transport_entries,
                         transport_table=inst.transport_map) == [
        "[127.0.0.1]:" + str(direct.port), "example.org"]
    qid = inst.submit("user@example.org")
    attempt = inst.wait_for_delivery(qid)
    assert attempt.status == "sent", attempt.line
    assert attempt.relay.endswith(f":{relay.port}")
    [msg] = relay.wait_for(1)
    assert not msg.tls

    # 2. route: direct adds `example.org smtp:example.org`: the key now applies.
    routed = tables(policy("org", "encrypt", ["example.org"], route="direct"))
    assert (await roll_out(runner, [target(pod, inst, unrouted.revision)], routed)).ok
    assert bypassed_keys(routed.tls_entries, config, routed.transport_entries,
                         transport_table=inst.transport_map) == []
    # ... but only through a transport_maps that contains the operator's table.
    assert bypassed_keys(routed.tls_entries, config, routed.transport_entries,
                         transport_table="lmdb:/elsewhere/transport") == ["example.org"]
    qid = inst.submit("user@example.org")
    attempt = inst.wait_for_delivery(qid)
    assert attempt.status == "deferred", attempt.line
    assert attempt.reason == "TLS is required, but was not offered by host example.org[127.0.0.1]"
    assert direct.messages == [] and len(relay.messages) == 1

    # 3. A key equal to the relayhost verbatim applies to everything relayed.
    relay_key = tables(policy("org", "encrypt", ["example.org"], route="direct"),
                       policy("relay", "encrypt", [relay.nexthop]))
    assert (await roll_out(runner, [target(pod, inst, routed.revision)], relay_key)).ok
    assert bypassed_keys(relay_key.tls_entries, config, relay_key.transport_entries) == []
    qid = inst.submit("user@other.example")
    attempt = inst.wait_for_delivery(qid)
    assert attempt.status == "deferred", attempt.line
    assert attempt.relay.endswith(f":{relay.port}")
    assert attempt.reason.startswith("TLS is required, but was not offered by host 127.0.0.1")
    assert len(relay.messages) == 1


async def test_without_relayhost_nothing_is_bypassed(
        runner: LocalPodRunner, make_pod: PodFactory) -> None:
    pod, _ = make_pod("relay-0")
    config = await read_instance_config(runner, pod)
    assert config.relayhost == "" and config.relay_nexthops == ()
    assert bypassed_keys(["example.org", "[192.0.2.1]:25"], config) == []
