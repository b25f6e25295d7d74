"""The argv builders of :mod:`mailtls_operator.postfix`: what may become an argument.

Pure tests, plus a check of the queue-id syntax against ids real Postfix issues.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailtls_operator import postfix
from mailtls_operator.rollout import sample_keys
from mailtls_operator.routing import InstanceConfig, bypassed_keys
from testbed import LocalPodRunner

from .conftest import BOTH_VERSIONS, PodFactory


def test_argv_shapes() -> None:
    assert postfix.postmap_compile("lmdb", "/var/lib/mailtls/tls_policy") == [
        "postmap", "lmdb:/var/lib/mailtls/tls_policy"]
    assert postfix.postmap_query("bücher.example", "cdb", "/m/t") == [
        "postmap", "-q", "bücher.example", "cdb:/m/t"]
    assert postfix.postmap_query_stdin("hash", "/m/t") == ["postmap", "-q", "-", "hash:/m/t"]
    assert postfix.postfix_reload() == ["postfix", "reload"]
    assert postfix.postfix_reload(config_dir="/etc/postfix-out") == [
        "postfix", "-c", "/etc/postfix-out", "reload"]
    assert postfix.postconf_get() == ["postconf", "-x", "relayhost", "transport_maps",
                                      "smtp_tls_policy_maps", "smtp_dns_support_level"]
    assert postfix.write_file("/m/t.mailtls-new") == [
        "sh", "-c", postfix.WRITE_SCRIPT, "mailtls-write", "/m/t.mailtls-new"]
    assert postfix.move("/m/a", "/m/b") == ["mv", "-f", "--", "/m/a", "/m/b"]
    assert postfix.postqueue_schedule("3F2A1B2C9D") == ["postqueue", "-i", "3F2A1B2C9D"]
    assert postfix.postqueue_json() == ["postqueue", "-j"]


@pytest.mark.parametrize(("map_type", "suffix"), [
    ("lmdb", ".lmdb"), ("cdb", ".cdb"), ("hash", ".db"), ("texthash", "")])
def test_database_suffix(map_type: str, suffix: str) -> None:
    assert postfix.db_suffix(map_type) == suffix
    assert postfix.db_path(map_type, "/m/t") == "/m/t" + suffix
    assert postfix.compiles(map_type) == bool(suffix)


@pytest.mark.parametrize("bad", [
    "relative/path", "/m/with space", "/m/../etc/passwd", "/m/./t", "/m//t", "/m/t/",
    "/m/t:x", "/m/t,x", "/m/$(id)", "/m/t\n", "/m/`x`", "/m/\"q\"", "-rf", "", "/",
    "/m/" + "a" * 1100])
def test_unsafe_paths_are_refused(bad: str) -> None:
    with pytest.raises(postfix.InvalidArgument):
        postfix.check_map_path(bad)
    with pytest.raises(postfix.InvalidArgument):
        postfix.write_file(bad)


@given(st.text(max_size=40))
def test_a_path_that_passes_is_one_plain_absolute_word(text: str) -> None:
    path = "/" + text
    try:
        postfix.check_map_path(path)
    except postfix.InvalidArgument:
        return
    assert path.isascii() and path.startswith("/") and ".." not in path.split("/")
    assert not any(c in path for c in " \t\n:,$`'\"\\;&|<>*?[]{}()#=")


@pytest.mark.parametrize("bad", ["bdb", "LMDB", "regexp", "proxy:lmdb", ""])
def test_unknown_map_types_are_refused(bad: str) -> None:
    with pytest.raises(postfix.InvalidArgument):
        postfix.map_spec(bad, "/m/t")


@pytest.mark.parametrize("key", ["", "-", "a b", "a\tb", "a\nb", "a\x00b", "a\x7f"])
def test_query_keys_must_be_one_table_key(key: str) -> None:
    with pytest.raises(postfix.InvalidArgument):
        postfix.postmap_query(key, "lmdb", "/m/t")


@pytest.mark.parametrize("qid", ["3F2A1B", "3F2A1B2C9DE", "4Xk9Bc3FgHzJ7Kp", "4Xk9Bc3FgHzJ"])
def test_queue_ids(qid: str) -> None:
    assert postfix.check_queue_id(qid) == qid


@pytest.mark.parametrize("qid", [
    "3F2A1", "3f2a1b", "-f", "ALL", "3F2A1B 2", "4Xk9Bc3FgHAJ7Kp", "4Xk9Bc3FgHzJ7Kz",
    "4Xk9Bc3FgHz", "../deferred"])
def test_not_queue_ids(qid: str) -> None:
    with pytest.raises(postfix.InvalidArgument):
        postfix.check_queue_id(qid)


def test_parse_postconf() -> None:
    out = "relayhost = [relay.example]:587\ntransport_maps =\nsmtp_tls_policy_maps = lmdb:/x\n"
    assert postfix.parse_postconf(out) == {"relayhost": "[relay.example]:587",
                                           "transport_maps": "",
                                           "smtp_tls_policy_maps": "lmdb:/x"}


def test_sample_keys_are_deterministic_and_spread() -> None:
    entries = {f"k{n:03d}": "may" for n in range(100)}
    assert sample_keys(entries, 5) == ["k000", "k025", "k050", "k074", "k099"]
    assert sample_keys({"a": "x", "b": "y"}, 5) == ["a", "b"]
    assert sample_keys(entries, 0) == []
    assert sample_keys({"a": "x", "r": "y"}, 5, exclude=["r"]) == ["a"]


def test_bypassed_keys_rules() -> None:
    relay = InstanceConfig(relayhost="[Relay.Example]:587", transport_maps="lmdb:/m/transport")
    keys = ["a.example", ".a.example", "b.example", "[relay.example]:587", "[mx.b.example]",
            "mailtls-revision.invalid"]
    assert bypassed_keys(keys, relay, ["a.example", ".a.example"]) == [
        "[mx.b.example]", "b.example"]
    assert bypassed_keys(keys, relay, ["a.example"], transport_table="lmdb:/other") == [
        ".a.example", "[mx.b.example]", "a.example", "b.example"]
    no_transport = InstanceConfig(relayhost="[relay.example]:587")
    assert "a.example" in bypassed_keys(keys, no_transport, ["a.example"])
    via_default_transport = InstanceConfig(default_transport="smtp:[relay.example]:587")
    assert via_default_transport.relay_nexthops == ("[relay.example]:587",)
    assert bypassed_keys(["b.example"], via_default_transport) == ["b.example"]
    several = InstanceConfig(relayhost="[r1.example]:25, [r2.example]:25")
    assert bypassed_keys(["[r2.example]:25", "x.example"], several) == ["x.example"]
    assert bypassed_keys(keys, InstanceConfig()) == []


@pytest.mark.postfix
@BOTH_VERSIONS
async def test_queue_id_syntax_matches_real_postfix(
        runner: LocalPodRunner, make_pod: PodFactory) -> None:
    """Both id forms Postfix issues are accepted, and ``postqueue -i`` takes them."""
    for name, long_ids in (("short", "no"), ("long", "yes")):
        pod, inst = make_pod(name, extra_main_cf={"enable_long_queue_ids": long_ids,
                                                  "defer_transports": "smtp"})
        qid = inst.submit("user@example.invalid")
        assert postfix.check_queue_id(qid) == qid
        assert (len(qid) > 11) == (long_ids == "yes"), qid
        res = await runner.run(pod, postfix.postqueue_schedule(qid), timeout=10)
        assert res.ok, res.message()
