"""The model is total over what the API server accepts (and over hostile metadata): any
object generated from the CRD's own schema becomes a Policy or a clear refusal -- in the
model, in the operator's world index and in the render of an instance -- never an
exception; the same for MailTLSDiscovery objects."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailtls_operator.crd import cel_errors, status_errors, version_schema
from mailtls_operator.crd.timefmt import is_kube_datetime, parse_instant
from mailtls_operator.discovery.objects import DiscoveryInvalid, crd_path, load_discovery
from mailtls_operator.policy import Policy, PolicyInvalid, load_policy
from mailtls_operator.render import render
from mailtls_operator.status import policy_status
from mailtls_operator.world import World

from .schema_strategy import from_schema, hostile_metadata, hostile_scalars, kube_datetimes

SPEC = version_schema()["properties"]["spec"]
NOWS = st.sampled_from([datetime(2026, 12, 1, tzinfo=UTC),
                        datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
                        datetime(1, 1, 1, tzinfo=UTC)])
good_metadata = st.fixed_dictionaries({"name": st.sampled_from(["p", "q.r"])}, optional={
    "namespace": st.sampled_from(["mail", "", None, "default"]),
    "generation": st.integers(0, 2**63 - 1),
    "creationTimestamp": kube_datetimes(),
    "uid": st.just("u1")})
exception_windows = st.fixed_dictionaries({
    "startsAt": kube_datetimes(), "expiresAt": kube_datetimes(), "reason": st.just("INC-1")})


def _obj(meta: Any, spec: Any) -> dict[str, Any]:
    return {"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy", "metadata": meta,
            "spec": spec}


def _spoiled(spec: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``spec`` with one field's value replaced by a hostile scalar (a 5,000-digit
    integer, NaN, null, a list...): what a file, not the API server, may hold."""
    return st.sampled_from(sorted(spec)).flatmap(
        lambda k: hostile_scalars.map(lambda v: {**spec, k: v}))


specs = st.one_of(from_schema(SPEC), from_schema(SPEC).flatmap(
    lambda s: exception_windows.map(lambda e: {**s, "exception": e})),
    from_schema(SPEC).flatmap(_spoiled))


def _through_everything(objs: list[dict[str, Any]], now: datetime) -> None:
    for obj in objs:
        try:
            assert isinstance(load_policy(obj, now=now), Policy)
        except PolicyInvalid as exc:
            assert exc.errors and all("\n" not in str(e) for e in exc.errors)
    world = World(clock=lambda: now)
    keys = set()
    for obj in objs:
        keys |= world.upsert_policy(obj)
    for key in keys | {("default", "relay"), ("mail", "relay")}:
        render(world.policies_for(key), instance=key, now=now)
    for rec in world.records():  # the status the operator would write: the server takes it
        assert status_errors(policy_status(rec, [], now)) == []


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.lists(st.tuples(good_metadata | hostile_metadata, specs), min_size=1, max_size=3),
       NOWS)
def test_any_object_the_schema_accepts_is_a_policy_or_a_refusal_everywhere(
        objs: list[tuple[Any, Any]], now: datetime) -> None:
    _through_everything([_obj(m, s) for m, s in objs], now)


@settings(max_examples=60, deadline=None)
@given(exception_windows)
def test_exception_windows_never_raise_in_the_twin_or_in_cel_python(exc: dict[str, Any]
                                                                     ) -> None:
    spec = {"destinations": ["a.example"], "level": "may", "exception": exc}
    twin = cel_errors(spec)
    oracle = cel_errors(spec, oracle=True)  # cel-python: errors become refusals too
    both_in_range = True
    try:
        parse_instant(exc["startsAt"]), parse_instant(exc["expiresAt"])
    except ValueError:
        both_in_range = False
    if both_in_range and not any(c in exc["startsAt"] + exc["expiresAt"] for c in ",tz"):
        assert bool(twin) == bool(oracle)


@pytest.mark.parametrize("starts,expires,ok", [
    ("9999-12-30T00:00:00Z", "9999-12-31T23:59:59Z", True),
    ("9999-12-31T23:59:59.999999998Z", "9999-12-31T23:59:59.999999999Z", True),
    ("9999-12-31T00:00:00Z", "9999-12-31T23:59:59-01:00", False),  # past year 9999 in UTC
    ("0001-01-01T00:00:00+01:00", "0001-01-02T00:00:00Z", False),  # before year 1 in UTC
    ("2026-01-01T00:00:00.0000001Z", "2026-01-01T00:00:00.0000002Z", True),  # nanoseconds
    ("2026-01-01t00:00:00Z", "2026-01-02T00:00:00Z", False),  # schema yes, CEL no
    ("2026-01-01T00:00:60Z", "2026-01-02T00:00:00Z", False),  # no leap second
])
def test_year_9999_windows_are_judged_not_raised(starts: str, expires: str, ok: bool) -> None:
    now = datetime(9999, 12, 30, tzinfo=UTC)
    obj = _obj({"name": "p"}, {"destinations": ["a.example"], "level": "may",
                               "exception": {"startsAt": starts, "expiresAt": expires,
                                             "reason": "INC-1"}})
    if ok:
        assert load_policy(obj, now=now).exception is not None
    else:
        with pytest.raises(PolicyInvalid, match=r"spec\.exception"):
            load_policy(obj, now=now)
    world = World(clock=lambda: now)
    world.upsert_policy(obj)
    assert (world.policies["default"]["p"].policy is not None) == ok


@pytest.mark.parametrize("text,accepted", [
    ("2026-01-01T00:00:00Z", True), ("2026-01-01t00:00:00z", True),
    ("2026-01-01T00:00:00.123456789123Z", True), ("2026-01-01T00:00:00+99:99", True),
    ("2026-01-01T23:59:60Z", False), ("2026-02-30T00:00:00Z", False),
    ("2026-01-01T00:00:00", False), ("2026-01-01 00:00:00Z", False),
])
def test_the_schema_date_time_is_kube_openapis(text: str, accepted: bool) -> None:
    assert is_kube_datetime(text) is accepted


@pytest.mark.parametrize("meta,reason", [
    ({"name": "p", "namespace": 5}, "metadata.namespace: Invalid value: must be of type string"),
    ({"name": "p", "generation": "3"}, "metadata.generation: Invalid value: must be an integer"),
    ({"name": "p", "generation": 10**5000}, "metadata.generation: Invalid value: 16610-bit"),
    ({"name": "p", "generation": 1.5}, "metadata.generation"),
    ({"name": "p", "creationTimestamp": "yesterday"}, "metadata.creationTimestamp"),
    ({"name": "p", "creationTimestamp": 5}, "metadata.creationTimestamp"),
    ([], "metadata: Invalid value: must be of type object"),
])
def test_hostile_metadata_is_refused_naming_the_field(meta: Any, reason: str) -> None:
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(_obj(meta, {"destinations": ["a.example"], "level": "may"}))
    assert reason in str(caught.value)


@pytest.mark.parametrize("namespace", [None, ""])
def test_an_unset_namespace_is_the_default_one_as_with_kubectl(namespace: Any) -> None:
    got = load_policy(_obj({"name": "p", "namespace": namespace},
                           {"destinations": ["a.example"], "level": "may"}))
    assert got.ref == "default/p"


DISCOVERY_SPEC = yaml.safe_load(crd_path().read_text())["spec"]["versions"][0][
    "schema"]["openAPIV3Schema"]["properties"]["spec"]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(good_metadata | hostile_metadata,
       from_schema(DISCOVERY_SPEC) | from_schema(DISCOVERY_SPEC).flatmap(_spoiled))
def test_any_discovery_object_is_a_discovery_or_a_refusal(meta: Any, spec: Any) -> None:
    try:
        load_discovery({"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSDiscovery",
                        "metadata": meta, "spec": spec})
    except DiscoveryInvalid as exc:
        assert "\n" not in str(exc)
