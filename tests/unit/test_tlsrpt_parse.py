"""The TLSRPT datagram reader: the datagrams Postfix 3.10 really sent read as measured, and any
bytes at all give a report or a refusal -- never an exception (the real collector dies on
one wrong-shaped datagram)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailtls_operator.tlsrpt import (
    MAX_DATAGRAM,
    RESULT_TYPES,
    Failure,
    PolicyResult,
    Refusal,
    Report,
    parse,
)

# Captured from Postfix 3.10.13 / libtlsrpt 0.5.0rc1 (tests/postfix/test_tlsrpt_measured.py)
NO_STARTTLS = (b'{"d": "nostarttls.test","pr": "v=TLSRPTv1; rua=mailto:tlsrpt@nostarttls.test",'
               b'"policies":[{"policy-type":9,"policy-domain": "nostarttls.test","failure-details":'
               b'[{"c":201,"s": "127.0.0.1","n": "mx.nostarttls.test","h": "250-sink.mailtls.test'
               b'\\r\\n250-SIZE 33554432\\r\\n250-8BITMIME\\r\\n250-SMTPUTF8\\r\\n250 HELP",'
               b'"r": "127.0.0.1"}],"t":1,"f":1}]}')
SELF_SIGNED = (b'{"d": "selfsecure.test","pr": "v=TLSRPTv1; rua=mailto:tlsrpt@selfsecure.test",'
               b'"policies":[{"policy-type":9,"policy-domain": "selfsecure.test","failure-details":'
               b'[{"c":205,"s": "127.0.0.1","n": "mx.selfsecure.test","h": "250-sink.mailtls.test'
               b'\\r\\n250 HELP","r": "127.0.0.1","f": "self-signed_certificate"}],"t":1,"f":1}]}')
SUCCESS = (b'{"d": "may.test","pr": "v=TLSRPTv1; rua=mailto:tlsrpt@may.test","policies":'
           b'[{"policy-type":9,"policy-domain": "may.test","t":0,"f":0}]}')


def test_a_measured_failure_reads_with_its_rfc8460_type() -> None:
    report = parse(NO_STARTTLS)
    assert report == Report(
        domain="nostarttls.test", record="v=TLSRPTv1; rua=mailto:tlsrpt@nostarttls.test",
        version=None, policies=(PolicyResult("no-policy-found", "nostarttls.test", False, (
            Failure(201, "starttls-not-supported", receiving_mx="mx.nostarttls.test",
                    receiving_ip="127.0.0.1", sending_ip="127.0.0.1", reason=None,
                    additional=None,
                    ehlo="250-sink.mailtls.test\r\n250-SIZE 33554432\r\n250-8BITMIME\r\n"
                         "250-SMTPUTF8\r\n250 HELP"),)),))
    assert not report.success


def test_a_measured_validation_failure_keeps_its_reason() -> None:
    report = parse(SELF_SIGNED)
    assert isinstance(report, Report)
    [failure] = report.policies[0].failures
    assert (failure.result_type, failure.reason) == ("validation-failure",
                                                      "self-signed_certificate")


def test_a_measured_success_has_no_failures() -> None:
    report = parse(SUCCESS)
    assert isinstance(report, Report)
    assert report.success
    assert report.policies == (PolicyResult("no-policy-found", "may.test", True, ()),)


def test_the_newer_protocol_version_field_is_accepted_and_another_refused() -> None:
    with_dpv = b'{"dpv": "1", ' + SUCCESS[1:]
    report = parse(with_dpv)
    assert isinstance(report, Report) and report.version == "1"
    assert parse(b'{"dpv": "2", ' + SUCCESS[1:]) == Refusal(
        "datagram protocol version '2' is not 1")


def _datagram(**changes: Any) -> bytes:
    doc = json.loads(NO_STARTTLS)
    policy = doc["policies"][0]
    for key, value in changes.items():
        where, _, field = key.partition("__")
        target = {"top": doc, "policy": policy,
                  "failure": policy["failure-details"][0]}[where]
        if value is _DROP:
            del target[field.replace("_", "-")]
        else:
            target[field.replace("_", "-")] = value
    return json.dumps(doc).encode()


_DROP = object()


@pytest.mark.parametrize(("changes", "reason"), [
    ({"top__policies": 5}, "policies is not a list"),
    ({"top__policies": []}, "policies is empty"),
    ({"top__d": "evil domain\n"}, "d is not a domain name"),
    ({"top__d": 7}, "d is not a string"),
    ({"top__pr": _DROP}, "pr is not a string"),
    ({"policy__t": True}, "t is not an integer"),
    ({"policy__t": 2}, "policy t does not count its failure-details"),
    ({"policy__f": 7}, "policy f is 7, not 0 or 1"),
    ({"policy__f": _DROP}, "f is not an integer"),
    ({"policy__policy_type": 3}, "policy-type 3 is unknown"),
    ({"failure__c": "201"}, "c is not an integer"),
    ({"failure__n": "x" * 5000}, "n is longer than 4096 characters"),
])
def test_a_wrong_shape_is_refused_with_its_reason(changes: dict[str, Any], reason: str) -> None:
    assert parse(_datagram(**changes)) == Refusal(reason)


def test_an_unknown_failure_code_is_other_not_a_new_label() -> None:
    report = parse(_datagram(failure__c=901))
    assert isinstance(report, Report)
    assert report.policies[0].failures[0].result_type == "other"
    assert set(RESULT_TYPES.values()) >= {"starttls-not-supported", "validation-failure"}


@pytest.mark.parametrize(("data", "reason"), [
    (b"garbage\xff", "not UTF-8"),
    (b"[]", "datagram is not an object"),
    (b"[" * 100_000 + b"]" * 100_000, f"datagram of 200000 bytes is over {MAX_DATAGRAM}"),
    (b'{"d": [[[[[[1]]]]]]}', "not JSON: nested more than 5 deep"),
    (b'{"d": NaN}', "not JSON: NaN is not JSON"),
    ("a str", "not bytes but str"),
])
def test_hostile_input_is_refused_not_raised(data: Any, reason: str) -> None:
    assert parse(data) == Refusal(reason)


@settings(max_examples=500, deadline=2000)
@given(st.binary(max_size=2048))
def test_any_bytes_give_a_report_or_a_refusal(data: bytes) -> None:
    assert isinstance(parse(data), Report | Refusal)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["d", "pr", "dpv", "policies", "policy-type", "policy-domain", "t",
                         "f", "failure-details", "c", "n", "r", "s", "h", "a", "x"]),
        inner, max_size=6),
    max_leaves=30)


@settings(max_examples=500, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_any_json_gives_a_report_or_a_refusal(value: Any) -> None:
    assert isinstance(parse(json.dumps(value).encode()), Report | Refusal)


@settings(max_examples=200, deadline=2000)
@given(st.sampled_from(sorted(RESULT_TYPES)), st.text(max_size=50), st.booleans())
def test_what_libtlsrpt_writes_reads_back(code: int, ehlo: str, with_dpv: bool) -> None:
    """Built the way libtlsrpt builds it, the datagram reads back field for field."""
    detail = {"c": code, "s": "192.0.2.1", "n": "mx.example.org", "h": ehlo,
              "r": "192.0.2.2"}
    doc: dict[str, Any] = {"d": "example.org", "pr": "v=TLSRPTv1; rua=mailto:r@example.org",
                           "policies": [{"policy-type": 9, "policy-domain": "example.org",
                                         "failure-details": [detail], "t": 1, "f": 1}]}
    if with_dpv:
        doc = {"dpv": "1", **doc}
    report = parse(json.dumps(doc).encode())
    assert isinstance(report, Report)
    [failure] = report.policies[0].failures
    assert (failure.code, failure.result_type, failure.ehlo) == (code, RESULT_TYPES[code], ehlo)
