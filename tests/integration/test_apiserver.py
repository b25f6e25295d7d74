"""The test API server does what a real one does wherever an operator could tell the difference.

Each behaviour is proven over HTTP with the official ``kubernetes`` client (run in a thread:
it is synchronous and the server shares this test's loop), or raw aiohttp where the client
hides the wire (watch streams, content types, headers).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import aiohttp
import kmock
import kopf
import pytest
import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from mailtls_operator.crd import validate_with_crd
from testbed.apiserver import (
    WRITE_VERBS,
    ApiRequest,
    ApiServer,
    RunOperator,
    fast_settings,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")
GROUP, VERSION, PLURAL = "mailtls.io", "v1alpha1", "mailtlspolicies"
POLICIES = "/apis/mailtls.io/v1alpha1/namespaces/default/mailtlspolicies"
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
MERGE = {"Content-Type": "application/merge-patch+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The sync client off the loop, so that the server in this loop can answer.  Any: the
    client types custom objects as ``object`` and every model field as optional, and these
    tests assert the exact shapes the server returned."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def refused(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """The HTTP code and the Status of a request that must fail."""
    try:
        await call(fn, *args, **kwargs)
    except ApiException as e:
        return e.status, json.loads(e.body or "{}")
    pytest.fail("the request was accepted")


def policy(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MailTLSPolicy",
            "metadata": {"name": name},
            "spec": spec or {"destinations": ["a.example"], "level": "encrypt"}}


def configmap(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}


def pod(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "postfix", "image": "postfix"}]}}


async def read_events(response: aiohttp.ClientResponse, count: int,
                      timeout: float = 5.0) -> list[dict[str, Any]]:
    """The next ``count`` watch events (fewer if the server ends the stream)."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(events) < count and (line := await response.content.readline()):
            events.append(json.loads(line))
    return events


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["object"].get("metadata", {}).get("name", "")) for e in events]


@pytest.fixture
def core(kube_client: k8s.ApiClient) -> k8s.CoreV1Api:
    return k8s.CoreV1Api(kube_client)


@pytest.fixture
def custom(kube_client: k8s.ApiClient) -> k8s.CustomObjectsApi:
    return k8s.CustomObjectsApi(kube_client)


# ----------------------------------------------------------------------------------- metadata


async def test_create_sets_server_metadata(core: k8s.CoreV1Api,
                                           custom: k8s.CustomObjectsApi) -> None:
    cm = await call(core.create_namespaced_config_map, "default", {"metadata": {
        "name": "a", "uid": "client-made", "creationTimestamp": "2000-01-01T00:00:00Z"}})
    pol = await call(custom.create_namespaced_custom_object,
                     GROUP, VERSION, "default", PLURAL, policy("p"))

    assert cm.metadata.namespace == "default"
    assert uuid.UUID(cm.metadata.uid) and cm.metadata.uid != "client-made"
    age = datetime.datetime.now(datetime.UTC) - cm.metadata.creation_timestamp
    assert datetime.timedelta(0) <= age < datetime.timedelta(seconds=10)
    assert cm.metadata.generation is None  # ConfigMaps have no generation
    meta = pol["metadata"]
    assert meta["generation"] == 1 and meta["namespace"] == "default" and uuid.UUID(meta["uid"])
    assert int(meta["resourceVersion"]) > int(cm.metadata.resource_version)  # one global counter
    assert pol["spec"]["mode"] == "enforce"  # the CRD's default, applied by the server


async def test_resource_version_on_create_is_refused(core: k8s.CoreV1Api) -> None:
    code, status = await refused(core.create_namespaced_config_map, "default",
                                 {"metadata": {"name": "a", "resourceVersion": "7"}})
    assert (code, status["reason"]) == (400, "BadRequest")


async def test_generate_name_and_already_exists(core: k8s.CoreV1Api) -> None:
    made = await call(core.create_namespaced_config_map, "default",
                      {"metadata": {"generateName": "kopf-event-"}})
    assert made.metadata.name.startswith("kopf-event-") and len(made.metadata.name) == 16
    code, status = await refused(core.create_namespaced_config_map, "default",
                                 {"metadata": {"name": made.metadata.name}})
    assert (code, status["reason"]) == (409, "AlreadyExists")
    assert status["message"] == f'configmaps "{made.metadata.name}" already exists'


async def test_generation_bumps_on_spec_changes_only(apiserver: ApiServer,
                                                     custom: k8s.CustomObjectsApi) -> None:
    args = (GROUP, VERSION, "default", PLURAL, "p")
    await call(custom.create_namespaced_custom_object, *args[:4], policy("p"))

    labelled = await call(custom.patch_namespaced_custom_object, *args,
                          {"metadata": {"labels": {"team": "mail"}}})
    with_status = await call(custom.patch_namespaced_custom_object_status, *args,
                             {"status": {"observedGeneration": 1}})
    respecced = await call(custom.patch_namespaced_custom_object, *args,
                           {"spec": {"level": "may"}})
    unchanged = await call(custom.patch_namespaced_custom_object, *args,
                           {"spec": {"level": "may"}})

    versions = [int(o["metadata"]["resourceVersion"]) for o in (labelled, with_status, respecced)]
    assert versions == sorted(versions) and len(set(versions)) == 3
    assert [o["metadata"]["generation"] for o in (labelled, with_status, respecced)] == [1, 1, 2]
    # A write that changes nothing is not a change: same resourceVersion, no watch event.
    assert unchanged["metadata"]["resourceVersion"] == respecced["metadata"]["resourceVersion"]
    assert apiserver.resource_version == versions[-1]


# ---------------------------------------------------------------------------------- selectors


@pytest.mark.parametrize(("selector", "expected"), [
    ("app=web", ["a", "b"]),
    ("app==web", ["a", "b"]),
    ("app!=web", ["c", "d"]),
    ("app in (web, db)", ["a", "b", "c"]),
    ("app notin (web)", ["c", "d"]),
    ("tier", ["a", "b"]),
    ("!tier", ["c", "d"]),
    ("app=web,tier=back", ["b"]),
    ("app in (web),!tier", []),
    ("", ["a", "b", "c", "d"]),
])
async def test_label_selector_filters_lists(core: k8s.CoreV1Api, selector: str,
                                            expected: list[str]) -> None:
    for name, labels in (("a", {"app": "web", "tier": "front"}),
                         ("b", {"app": "web", "tier": "back"}), ("c", {"app": "db"}), ("d", {})):
        await call(core.create_namespaced_pod, "default", pod(name, **labels))
    pods = await call(core.list_namespaced_pod, "default", label_selector=selector)
    assert [p.metadata.name for p in pods.items] == expected


async def test_field_selector_filters_lists(core: k8s.CoreV1Api) -> None:
    await call(core.create_namespace, {"metadata": {"name": "other"}})
    for namespace, name in (("default", "a"), ("default", "b"), ("other", "a")):
        await call(core.create_namespaced_config_map, namespace, configmap(name))

    by_name = await call(core.list_config_map_for_all_namespaces, field_selector="metadata.name=a")
    by_ns = await call(core.list_config_map_for_all_namespaces,
                       field_selector="metadata.namespace=other")
    not_a = await call(core.list_namespaced_config_map, "default",
                       field_selector="metadata.name!=a")
    assert [(c.metadata.namespace, c.metadata.name) for c in by_name.items] == [
        ("default", "a"), ("other", "a")]
    assert [c.metadata.name for c in by_ns.items] == ["a"]
    assert [c.metadata.name for c in not_a.items] == ["b"]


@pytest.mark.parametrize(("param", "value"), [
    ("label_selector", "app in (web"), ("label_selector", "=x"),
    ("field_selector", "spec.data=x"), ("field_selector", "nonsense"),
])
async def test_malformed_or_unsupported_selectors_are_400(core: k8s.CoreV1Api, param: str,
                                                          value: str) -> None:
    code, status = await refused(core.list_namespaced_config_map, "default", **{param: value})
    assert (code, status["reason"]) == (400, "BadRequest")


@pytest.mark.parametrize(("method", "path", "kwargs"), [
    ("post", CONFIGMAPS, {"json": {"metadata": {"name": "a", "labels": ["x"]}}}),
    ("post", CONFIGMAPS, {"json": {"metadata": {"name": 5}}}),
    ("post", CONFIGMAPS, {"data": b"not json"}),
    ("get", CONFIGMAPS, {"params": {"limit": "many"}}),
    ("get", CONFIGMAPS, {"params": {"continue": "garbage"}}),
    ("get", CONFIGMAPS, {"params": {"watch": "true", "timeoutSeconds": "soon"}}),
    ("get", CONFIGMAPS, {"params": {"watch": "true", "resourceVersion": "latest"}}),
])
async def test_malformed_requests_are_400_not_server_errors(
        apiserver: ApiServer, method: str, path: str, kwargs: dict[str, Any]) -> None:
    response = await apiserver.request(method.upper(), path, **kwargs)
    assert response.status == 400 and (await response.json())["reason"] == "BadRequest"
    assert not apiserver.server_errors


async def test_watch_follows_objects_into_and_out_of_the_selection(apiserver: ApiServer) -> None:
    for name, app in (("a", "web"), ("c", "db")):
        await apiserver.post(CONFIGMAPS, json=configmap(name, app=app))
    async with apiserver.get(CONFIGMAPS, params={"watch": "true",
                                                 "labelSelector": "app=web"}) as watch:
        assert summary(await read_events(watch, 1)) == [("ADDED", "a")]
        await apiserver.patch(f"{CONFIGMAPS}/a", json={"data": {"k": "2"}}, headers=MERGE)
        await apiserver.patch(f"{CONFIGMAPS}/a", json={"metadata": {"labels": {"app": "x"}}},
                              headers=MERGE)
        await apiserver.patch(f"{CONFIGMAPS}/c", json={"metadata": {"labels": {"app": "web"}}},
                              headers=MERGE)
        await apiserver.post(CONFIGMAPS, json=configmap("d", app="db"))
        await apiserver.delete(f"{CONFIGMAPS}/c")
        events = await read_events(watch, 4)
    assert summary(events) == [("MODIFIED", "a"), ("DELETED", "a"), ("ADDED", "c"),
                               ("DELETED", "c")]


# --------------------------------------------------------------------------- status isolation


async def test_status_subresource_changes_only_status(custom: k8s.CustomObjectsApi) -> None:
    args = (GROUP, VERSION, "default", PLURAL, "p")
    created = await call(custom.create_namespaced_custom_object, *args[:4],
                         {**policy("p"), "status": {"smuggled": True}})
    assert "status" not in created  # dropped on create

    via_status = await call(custom.patch_namespaced_custom_object_status, *args, {
        "spec": {"level": "none"}, "metadata": {"labels": {"x": "y"}},
        "status": {"observedGeneration": 1}})
    assert via_status["spec"]["level"] == "encrypt"
    assert "labels" not in via_status["metadata"]
    assert via_status["status"] == {"observedGeneration": 1}

    via_main = await call(custom.patch_namespaced_custom_object, *args,
                          {"spec": {"level": "may"}, "status": {"observedGeneration": 99}})
    assert via_main["spec"]["level"] == "may"
    assert via_main["status"] == {"observedGeneration": 1}

    replaced = await call(custom.replace_namespaced_custom_object_status, *args,
                          {**via_main, "spec": {"level": "none"}, "status": {"entries": []}})
    assert replaced["status"] == {"entries": []} and replaced["spec"]["level"] == "may"


async def test_json_patch_on_status_may_test_the_resource_version(
        apiserver: ApiServer) -> None:
    """Kopf writes its progress this way: a ``test`` op on resourceVersion, then status ops."""
    created = await (await apiserver.post(POLICIES, json=policy("p"))).json()
    rv = created["metadata"]["resourceVersion"]
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
           {"op": "add", "path": "/status", "value": {"kopf": {"progress": {}}}}]
    ok = await apiserver.patch(f"{POLICIES}/p/status", json=ops, headers=JSON_PATCH)
    stale = await apiserver.patch(f"{POLICIES}/p/status", json=ops, headers=JSON_PATCH)
    assert ok.status == 200 and (await ok.json())["status"] == {"kopf": {"progress": {}}}
    assert stale.status == 422  # Kopf retries on 422 (APIUnprocessableEntityError)


# ----------------------------------------------------------------------- optimistic concurrency


async def test_stale_resource_version_is_409_and_changes_nothing(core: k8s.CoreV1Api) -> None:
    first = await call(core.create_namespaced_config_map, "default", configmap("a"))
    second = await call(core.patch_namespaced_config_map, "a", "default", {"data": {"k": "2"}})
    stale = first.metadata.resource_version

    put = await refused(core.replace_namespaced_config_map, "a", "default", {
        "metadata": {"name": "a", "resourceVersion": stale}, "data": {"k": "3"}})
    patch = await refused(core.patch_namespaced_config_map, "a", "default", {
        "metadata": {"resourceVersion": stale}, "data": {"k": "4"}})
    for code, status in (put, patch):
        assert (code, status["reason"]) == (409, "Conflict")
        assert status["message"].startswith('Operation cannot be fulfilled on configmaps "a"')
    now = await call(core.read_namespaced_config_map, "a", "default")
    assert now.data == {"k": "2"}
    assert now.metadata.resource_version == second.metadata.resource_version

    fresh = await call(core.patch_namespaced_config_map, "a", "default", {
        "metadata": {"resourceVersion": second.metadata.resource_version}, "data": {"k": "5"}})
    assert fresh.data == {"k": "5"}


async def test_put_replaces_the_whole_object(core: k8s.CoreV1Api) -> None:
    await call(core.create_namespaced_config_map, "default",
               {"metadata": {"name": "a", "labels": {"x": "y"}}, "data": {"a": "1", "b": "2"}})
    replaced = await call(core.replace_namespaced_config_map, "a", "default",
                          {"metadata": {"name": "a"}, "data": {"c": "3"}})
    assert replaced.data == {"c": "3"} and replaced.metadata.labels is None
    code, status = await refused(core.replace_namespaced_config_map, "nope", "default",
                                 {"metadata": {"name": "nope"}})
    assert (code, status["reason"], status["message"]) == (
        404, "NotFound", 'configmaps "nope" not found')


# --------------------------------------------------------------------------------- patch types


async def test_content_type_decides_the_patch(apiserver: ApiServer, core: k8s.CoreV1Api) -> None:
    await call(core.create_namespaced_config_map, "default",
               {"metadata": {"name": "a"}, "data": {"a": "1", "b": "2"}})
    url = f"{CONFIGMAPS}/a"

    merged = await apiserver.patch(url, json={"data": {"a": None, "c": "3"}}, headers=MERGE)
    assert (await merged.json())["data"] == {"b": "2", "c": "3"}
    ops = [{"op": "remove", "path": "/data/b"}, {"op": "add", "path": "/data/d", "value": "4"}]
    jsoned = await apiserver.patch(url, json=ops, headers=JSON_PATCH)
    assert (await jsoned.json())["data"] == {"c": "3", "d": "4"}
    # The official client sends dicts to core resources as strategic merge: merged here.
    strategic = await call(core.patch_namespaced_config_map, "a", "default", {"data": {"e": "5"}})
    assert strategic.data == {"c": "3", "d": "4", "e": "5"}

    failed_test = await apiserver.patch(url, headers=JSON_PATCH, json=[
        {"op": "test", "path": "/data/c", "value": "wrong"}, {"op": "remove", "path": "/data"}])
    applied = await apiserver.patch(url, json={"data": {}},
                                    headers={"Content-Type": "application/apply-patch+yaml"})
    not_a_list = await apiserver.patch(url, json={"data": {}}, headers=JSON_PATCH)
    plain_json = await apiserver.patch(url, json={"data": {}})
    assert [r.status for r in (failed_test, applied, not_a_list, plain_json)] == [
        422, 415, 400, 415]
    assert (await call(core.read_namespaced_config_map, "a", "default")).data == {
        "c": "3", "d": "4", "e": "5"}


# -------------------------------------------------------------------------------------- faults


async def test_injected_errors_happen_before_storage(apiserver: ApiServer,
                                                     core: k8s.CoreV1Api) -> None:
    fault = apiserver.inject_fault("create", "configmaps", status=500, times=2)
    for _ in range(2):
        code, status = await refused(core.create_namespaced_config_map, "default", configmap("a"))
        assert (code, status["reason"]) == (500, "InternalError")
        assert apiserver.get_object("v1/configmaps", "default", "a") is None
    await call(core.create_namespaced_config_map, "default", configmap("a"))
    assert fault.hits == 2 and fault.exhausted
    assert apiserver.request_count("create", "configmaps") == 3

    before = apiserver.get_object("v1/configmaps", "default", "a")
    apiserver.inject_fault(WRITE_VERBS, "configmaps", status=409)
    code, _ = await refused(core.patch_namespaced_config_map, "a", "default", {"data": {"k": "x"}})
    assert code == 409 and apiserver.get_object("v1/configmaps", "default", "a") == before


async def test_a_hang_then_error_costs_the_delay(apiserver: ApiServer,
                                                 core: k8s.CoreV1Api) -> None:
    apiserver.inject_fault("get", "configmaps", status=504, delay=0.3)
    started = time.monotonic()
    code, status = await refused(core.read_namespaced_config_map, "a", "default")
    assert (code, status["reason"]) == (504, "Timeout")
    assert time.monotonic() - started >= 0.3


async def test_a_write_whose_client_gave_up_is_not_stored(apiserver: ApiServer,
                                                          core: k8s.CoreV1Api) -> None:
    apiserver.inject_fault("create", "configmaps", status=None, delay=5.0)
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        await call(core.create_namespaced_config_map, "default", configmap("a"),
                   _request_timeout=0.2)
    await apiserver.wait_until(lambda: apiserver.in_flight == 0, timeout=2)  # cancelled
    assert apiserver.get_object("v1/configmaps", "default", "a") is None


# --------------------------------------------------------------------------------------- watch


async def test_watch_resumes_after_a_resource_version(apiserver: ApiServer) -> None:
    first = await (await apiserver.post(CONFIGMAPS, json=configmap("a"))).json()
    await apiserver.post(CONFIGMAPS, json=configmap("b"))
    await apiserver.patch(f"{CONFIGMAPS}/a", json={"data": {"k": "2"}}, headers=MERGE)
    since = first["metadata"]["resourceVersion"]

    async with apiserver.get(CONFIGMAPS, params={"watch": "true",
                                                 "resourceVersion": since}) as resumed:
        assert summary(await read_events(resumed, 2)) == [("ADDED", "b"), ("MODIFIED", "a")]
        await apiserver.delete(f"{CONFIGMAPS}/b")
        assert summary(await read_events(resumed, 1)) == [("DELETED", "b")]
    async with apiserver.get(CONFIGMAPS, params={"watch": "true"}) as fresh:  # current state
        assert summary(await read_events(fresh, 1)) == [("ADDED", "a")]


async def test_timeout_seconds_ends_the_stream(apiserver: ApiServer) -> None:
    async with apiserver.get(CONFIGMAPS, params={"watch": "true", "timeoutSeconds": "0.1"}) as w:
        assert await read_events(w, 1, timeout=2) == []


async def test_expired_history_answers_410(apiserver: ApiServer) -> None:
    first = await (await apiserver.post(CONFIGMAPS, json=configmap("a"))).json()
    await apiserver.post(CONFIGMAPS, json=configmap("b"))
    since = first["metadata"]["resourceVersion"]
    async with apiserver.get(CONFIGMAPS, params={"watch": "true", "resourceVersion": since}) as w:
        assert summary(await read_events(w, 1)) == [("ADDED", "b")]
        assert apiserver.expire_watches("v1/configmaps") == 1  # compacts, ends open streams
        ended = await read_events(w, 2)
    async with apiserver.get(CONFIGMAPS, params={"watch": "true", "resourceVersion": since}) as w:
        refused_at_once = await read_events(w, 2)
    for events in (ended, refused_at_once):
        assert [(e["type"], e["object"]["code"], e["object"]["reason"]) for e in events] == [
            ("ERROR", 410, "Expired")]


# -------------------------------------------------------------------------------- namespaces


async def test_namespaces_are_a_resource_again(apiserver: ApiServer, core: k8s.CoreV1Api) -> None:
    listed = await apiserver.get("/api/v1/namespaces")  # kmock 0.8: 500
    assert listed.status == 200
    assert [n["metadata"]["name"] for n in (await listed.json())["items"]] == [
        "default", "kube-public", "kube-system"]
    await call(core.create_namespace, {"metadata": {"name": "mail"}})
    assert (await call(core.read_namespace, "mail")).metadata.name == "mail"
    await call(core.create_namespaced_config_map, "mail", configmap("a"))
    assert [c.metadata.name for c in (await call(core.list_namespaced_config_map, "mail")).items
            ] == ["a"]


async def test_list_pages_share_one_resource_version(apiserver: ApiServer,
                                                     core: k8s.CoreV1Api) -> None:
    for index in range(5):
        await call(core.create_namespaced_config_map, "default", configmap(f"c{index}"))
    names, versions, token = [], set(), None
    while True:
        page = await call(core.list_namespaced_config_map, "default", limit=2, _continue=token)
        names += [c.metadata.name for c in page.items]
        versions.add(page.metadata.resource_version)
        token = page.metadata._continue
        if not token:
            break
    assert names == [f"c{i}" for i in range(5)] and len(versions) == 1


# ------------------------------------------------------------------------------------ deletion


async def test_finalizers_hold_the_deletion(apiserver: ApiServer, core: k8s.CoreV1Api) -> None:
    await call(core.create_namespaced_config_map, "default",
               {"metadata": {"name": "a", "finalizers": ["mailtls.io/cleanup"]}})
    async with apiserver.get(CONFIGMAPS, params={"watch": "true"}) as watch:
        await read_events(watch, 1)
        await call(core.delete_namespaced_config_map, "a", "default")
        marked = await call(core.read_namespaced_config_map, "a", "default")
        assert marked.metadata.deletion_timestamp is not None
        code, status = await refused(core.patch_namespaced_config_map, "a", "default",
                                     {"metadata": {"finalizers": ["mailtls.io/cleanup", "x/y"]}})
        assert (code, status["details"]["causes"][0]["field"]) == (422, "metadata.finalizers")
        await call(core.patch_namespaced_config_map, "a", "default",
                   {"metadata": {"finalizers": None}})
        # Marked (MODIFIED); the last finalizer's removal is the deletion itself (DELETED).
        assert summary(await read_events(watch, 2)) == [("MODIFIED", "a"), ("DELETED", "a")]
    assert apiserver.get_object("v1/configmaps", "default", "a") is None


async def test_dependents_are_garbage_collected(apiserver: ApiServer, core: k8s.CoreV1Api,
                                                custom: k8s.CustomObjectsApi) -> None:
    owner = await call(custom.create_namespaced_custom_object,
                       GROUP, VERSION, "default", PLURAL, policy("p"))
    reference = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MailTLSPolicy", "name": "p",
                 "uid": owner["metadata"]["uid"]}
    await call(core.create_namespaced_config_map, "default",
               {"metadata": {"name": "owned", "ownerReferences": [reference]}})
    await call(core.create_namespaced_config_map, "default", configmap("unowned"))
    await call(custom.delete_namespaced_custom_object, GROUP, VERSION, "default", PLURAL, "p")
    assert [c["metadata"]["name"] for c in apiserver.list_objects("v1/configmaps")] == ["unowned"]


# ---------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("spec", "field", "reason", "message"), [
    ({"destinations": ["a.example"], "level": "bogus"},
     "spec.level", "FieldValueNotSupported", 'Unsupported value: "bogus": supported values: '),
    ({"level": "encrypt"}, "spec.destinations", "FieldValueRequired", "Required value"),
    ({"destinations": ["a.example"], "level": "encrypt", "match": ["nexthop"]},
     "spec.match", "FieldValueForbidden",
     "Forbidden: match is only valid with level fingerprint, verify or secure"),
    ({"destinations": ["a.example"], "level": "none", "ciphers": "high"},
     "spec.level", "FieldValueInvalid", 'Invalid value: "object": level none disables TLS'),
])
async def test_invalid_policies_are_422_naming_the_field(
        custom: k8s.CustomObjectsApi, spec: dict[str, Any], field: str, reason: str,
        message: str) -> None:
    code, status = await refused(custom.create_namespaced_custom_object,
                                 GROUP, VERSION, "default", PLURAL, policy("bad", **spec))
    assert (code, status["reason"], status["details"]["kind"]) == (422, "Invalid", "MailTLSPolicy")
    [cause] = status["details"]["causes"]
    assert (cause["field"], cause["reason"]) == (field, reason)
    assert cause["message"].startswith(message)
    assert status["message"] == f'MailTLSPolicy.mailtls.io "bad" is invalid: {field}: ' + (
        cause["message"])
    # The operator's validator is the one deciding: same field, same verdict.
    assert [e.field for e in validate_with_crd(policy("bad", **spec))] == [field]


async def test_updates_and_patches_are_validated_too(custom: k8s.CustomObjectsApi) -> None:
    args = (GROUP, VERSION, "default", PLURAL, "p")
    created = await call(custom.create_namespaced_custom_object, *args[:4], policy("p"))
    patched = await refused(custom.patch_namespaced_custom_object, *args,
                            {"spec": {"match": ["nexthop"]}})
    put = await refused(custom.replace_namespaced_custom_object, *args,
                        {**created, "spec": {"destinations": [], "level": "encrypt"}})
    assert [code for code, _ in (patched, put)] == [422, 422]
    assert (await call(custom.get_namespaced_custom_object, *args))["spec"] == created["spec"]


async def test_unknown_fields_are_pruned_or_refused_when_strict(apiserver: ApiServer) -> None:
    body = policy("p", destinations=["a.example"], level="may", tafiles=["/x"])
    lenient = await apiserver.post(POLICIES, json=body)
    strict = await apiserver.post(POLICIES, json={**body, "metadata": {"name": "q"}},
                                  params={"fieldValidation": "Strict"})
    assert lenient.status == 201 and "tafiles" not in (await lenient.json())["spec"]
    assert lenient.headers["Warning"] == '299 - "unknown field \\"spec.tafiles\\""'
    assert strict.status == 400
    assert 'unknown field "spec.tafiles"' in (await strict.json())["message"]


# ---------------------------------------------------------------------------------- request log


async def test_request_log_names_verb_resource_and_subresource(
        apiserver: ApiServer, custom: k8s.CustomObjectsApi) -> None:
    args = (GROUP, VERSION, "default", PLURAL, "p")
    await call(custom.create_namespaced_custom_object, *args[:4], policy("p"))
    apiserver.reset_log()
    for generation in (1, 2):
        await call(custom.patch_namespaced_custom_object_status, *args,
                   {"status": {"observedGeneration": generation}})
    await call(custom.get_namespaced_custom_object, *args)
    await call(custom.list_namespaced_custom_object, *args[:4])

    assert apiserver.request_log[0] == ApiRequest(
        "patch", GROUP, VERSION, PLURAL, "status", "default", "p")
    assert apiserver.request_count("patch", PLURAL, subresource="status") == 2
    assert apiserver.request_count("patch", PLURAL, subresource=None) == 0
    assert apiserver.request_count({"get", "list"}, PLURAL) == 2
    apiserver.reset_log()
    assert apiserver.request_log == []


async def test_kmock_reactions_still_take_precedence(apiserver: ApiServer) -> None:
    apiserver[kmock.method.GET, f"{CONFIGMAPS}/a"] << 418
    assert (await apiserver.get(f"{CONFIGMAPS}/a")).status == 418
    assert (await apiserver.get(f"{CONFIGMAPS}/b")).status == 404


# --------------------------------------------------------------------------------- performance


@pytest.mark.parametrize(("resource", "path", "body"), [
    ("configmaps", CONFIGMAPS, configmap),
    ("mailtlspolicies", POLICIES, policy),
])
async def test_a_thousand_concurrent_creates_take_seconds(
        apiserver: ApiServer, resource: str, path: str, body: Callable[[str], dict[str, Any]],
        record_property: Callable[[str, object], None]) -> None:
    """kmock 0.8 took 60 s for 500 sequential creates; a burst must measure the operator."""
    count = 1000
    async with apiserver.get(path, params={"watch": "true"}) as watch:  # as an operator would
        started = time.monotonic()
        responses = await asyncio.gather(*(apiserver.post(path, json=body(f"o{i}"))
                                           for i in range(count)))
        elapsed = time.monotonic() - started
        events = await read_events(watch, count, timeout=30)
    record_property(f"{resource}_1000_creates_seconds", round(elapsed, 3))
    print(f"\n{count} concurrent {resource} creates: {elapsed:.2f} s")
    assert {r.status for r in responses} == {201}
    assert len(events) == count and len(apiserver.list_objects(resource)) == count
    assert elapsed < 30


# ------------------------------------------------------------------------------------ operator


def throwaway_registry() -> kopf.OperatorRegistry:
    """A tiny operator: a policy is mirrored into a ConfigMap it owns, and its status says so."""
    registry = kopf.OperatorRegistry()

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    def mirror(name: str, namespace: str | None, spec: kopf.Spec, body: kopf.Body,
               memo: kopf.Memo, patch: kopf.Patch, **_: Any) -> None:
        assert namespace is not None  # a namespaced resource
        memo.created.append(name)
        mirrored: Any = {"metadata": {"name": f"mirror-{name}"},
                         "data": {"level": spec["level"]}}  # the client takes dicts too
        kopf.adopt(mirrored)
        k8s.CoreV1Api(memo.client).create_namespaced_config_map(namespace, mirrored)
        patch.status["mirrored"] = True
        kopf.info(body, reason="Mirrored", message=f"into mirror-{name}")

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def forget(name: str, memo: kopf.Memo, **_: Any) -> None:
        memo.deleted.append(name)

    return registry


@pytest.mark.parametrize("namespaces", [(), ("default",), ("def*",)],
                         ids=["clusterwide", "namespaced", "glob"])
async def test_an_operator_runs_against_the_server(
        apiserver: ApiServer, kube_client: k8s.ApiClient, custom: k8s.CustomObjectsApi,
        run_operator: RunOperator, namespaces: tuple[str, ...]) -> None:
    memo = kopf.Memo(created=[], deleted=[], client=kube_client)
    settings = fast_settings()
    # Kopf serves namespace globs only by scanning (watching) namespaces; then it watches CRDs too.
    settings.scanning.disabled = not any("*" in n for n in namespaces)
    async with run_operator(throwaway_registry(), memo=memo, namespaces=namespaces,
                            settings=settings) as operator:
        assert [s.plural for s in operator.watched] == [PLURAL]
        await call(custom.create_namespaced_custom_object,
                   GROUP, VERSION, "default", PLURAL, policy("p"))

        mirrored = await apiserver.wait_until(
            lambda: apiserver.get_object("v1/configmaps", "default", "mirror-p"))
        done = await apiserver.wait_until(lambda: (
            (p := apiserver.get_object(PLURAL, "default", "p"))
            and p.get("status", {}).get("mirrored") and p))
        assert mirrored["data"] == {"level": "encrypt"}
        assert mirrored["metadata"]["ownerReferences"][0]["uid"] == done["metadata"]["uid"]
        assert done["metadata"]["finalizers"]  # Kopf's, for the deletion handler
        assert apiserver.request_count("patch", PLURAL, subresource="status") >= 1
        [event] = await apiserver.wait_until(lambda: apiserver.list_objects("v1/events"))
        assert (event["reason"], event["involvedObject"]["name"]) == ("Mirrored", "p")

        await call(custom.delete_namespaced_custom_object,
                   GROUP, VERSION, "default", PLURAL, "p")
        await apiserver.wait_until(lambda: apiserver.get_object(PLURAL, "default", "p") is None)
        assert apiserver.get_object("v1/configmaps", "default", "mirror-p") is None  # GC
    assert memo.created == ["p"] and memo.deleted == ["p"]
    assert not operator.thread.is_alive()
    if not settings.scanning.disabled:
        assert apiserver.watch_count("v1/namespaces") and apiserver.watch_count(
            "apiextensions.k8s.io/v1/customresourcedefinitions")
    print(f"\noperator ready in {operator.startup_seconds:.3f} s")


def status_of(apiserver: ApiServer, name: str) -> dict[str, Any]:
    obj = apiserver.get_object(PLURAL, "default", name)
    return (obj or {}).get("status") or {}


async def test_the_operator_retries_through_injected_errors(
        apiserver: ApiServer, kube_client: k8s.ApiClient, custom: k8s.CustomObjectsApi,
        run_operator: RunOperator) -> None:
    memo = kopf.Memo(created=[], deleted=[], client=kube_client)
    async with run_operator(throwaway_registry(), memo=memo):
        fault = apiserver.inject_fault("patch", PLURAL, subresource="status", status=500, times=2)
        await call(custom.create_namespaced_custom_object,
                   GROUP, VERSION, "default", PLURAL, policy("p"))
        await apiserver.wait_until(lambda: status_of(apiserver, "p").get("mirrored"))
    codes = [code for call_, code in apiserver.response_log if call_.subresource == "status"]
    assert codes == [500, 500, 200] and fault.hits == 2
    assert memo.created == ["p"]


async def test_the_operator_lists_again_after_410(
        apiserver: ApiServer, kube_client: k8s.ApiClient, custom: k8s.CustomObjectsApi,
        run_operator: RunOperator) -> None:
    memo = kopf.Memo(created=[], deleted=[], client=kube_client)
    async with run_operator(throwaway_registry(), memo=memo):
        watches, lists = apiserver.watch_count(PLURAL), apiserver.request_count("list", PLURAL)
        assert apiserver.expire_watches(PLURAL) == 1
        await apiserver.wait_until(lambda: apiserver.watch_count(PLURAL) > watches)
        assert apiserver.request_count("list", PLURAL) == lists + 1
        await call(custom.create_namespaced_custom_object,
                   GROUP, VERSION, "default", PLURAL, policy("p"))
        await apiserver.wait_until(lambda: status_of(apiserver, "p").get("mirrored"))
    assert memo.created == ["p"]
