"""A Kubernetes API server for integration tests: kmock's emulator made faithful where it matters.

kmock 0.8's ``KubernetesEmulator`` is a JSON store over HTTP. An operator tested against it
passes tests a real cluster would fail: no resourceVersion (so Kopf's finalizer JSON-patch gets
500), no 409 on stale writes, no status isolation, no selectors, no watch resumption, no
validation -- and it is quadratic, so a burst of 1,000 objects measures kmock, not the operator
(see ``/work/shared/kmock-notes.md``). :class:`ApiServer` keeps kmock's parts that work
(discovery, the object store ``.objects``, the ``kmock[...] << ...`` DSL, the HTTP server) and
replaces request handling for declared resources with the API server's semantics:

- metadata: uid, a global monotonic resourceVersion, creationTimestamp, namespace,
  ``generation`` (1 on create, +1 when anything but metadata/status changes), generateName;
- list/watch filtered by labelSelector and fieldSelector; lists paginate with limit/continue;
- ``/status`` writes change only status; main-resource writes ignore status;
- optimistic concurrency: a stale ``metadata.resourceVersion`` in PUT/PATCH answers 409;
- PUT replaces; the PATCH content type picks merge, JSON or (treated as merge) strategic patch,
  and strategic merge patch on a custom resource answers 415, as a real server does;
- no-op writes keep the resourceVersion and emit no watch event, like the real server;
- finalizers: DELETE marks ``deletionTimestamp``; removing the last finalizer deletes;
  owner references are garbage-collected when the owner is gone;
- watch resumes from a resourceVersion, answers ERROR 410 Expired when history is compacted;
- faults are injected *before* storage, so an injected 409/500 changes nothing;
- MailTLSPolicy is pruned, defaulted and validated by the CRD (schema + CEL, via the operator's
  own ``validate_with_crd``: RE2 patterns, list-type set/map) and refused with 422 Invalid
  naming each field; ``/status`` writes are pruned and validated by the status schema;
- a request log of (verb, group, version, resource, subresource, namespace, name), for RBAC
  and request-count assertions;
- kmock's quadratic costs are gone: only in-flight requests are kept for DSL matching, and
  objects are looked up by key.

It runs in the test's event loop; the operator under test runs in its own thread and loop
(:func:`run_operator`) and reaches it over loopback HTTP only.

Where it still differs from a real API server, and what the real one would do:
``KNOWN_DIFFERENCES.md`` beside this file.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import dataclasses
import datetime
import functools
import json
import math
import random
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Mapping
from typing import Any, Final, NamedTuple, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import kopf
from kmock._internal import apps, enums, parsing, rendering

from mailtls_operator import crd
from mailtls_operator.controller import operator_options

T = TypeVar("T")
Obj = dict[str, Any]
Key = tuple[kmock.resource, str | None, str]  # kmock's own key in ``.objects``

WRITE_VERBS: Final = frozenset({"create", "update", "patch", "delete", "deletecollection"})
ALL_VERBS: Final = frozenset({"get", "list", "watch"}) | WRITE_VERBS


class _AnyType:
    """A criterion that matches every value, None included (None itself means "absent")."""

    def __repr__(self) -> str:
        return "ANY"


ANY: Final = _AnyType()

# The reason the real API server puts into a Status for each HTTP code.
_REASONS: Final = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
    405: "MethodNotAllowed", 409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType",
    422: "Invalid", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
    504: "Timeout",
}
_SERVER_OWNED_META: Final = (
    "uid", "creationTimestamp", "generation", "deletionTimestamp",
    "deletionGracePeriodSeconds", "managedFields", "selfLink",
)
_GENERATE_CHARS: Final = "bcdfghjklmnpqrstvwxz2456789"  # apiserver's generateName alphabet
_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"


def api_error(code: int, message: str, *, reason: str | None = None,
              details: Mapping[str, Any] | None = None) -> kmock.KubernetesError:
    """An error that kmock renders as a Kubernetes ``Status``: the client sees a real API error."""
    return kmock.KubernetesError(status=code, reason=reason or _REASONS.get(code, "Unknown"),
                                 message=message, details=dict(details) if details else None)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------ resources


class FieldCause(NamedTuple):
    """One entry of ``Status.details.causes`` in a 422 answer."""

    field: str
    reason: str  # FieldValueInvalid, FieldValueRequired, ...
    message: str  # as the API server words it, without the field: "Unsupported value: ..."


Validator = Callable[[Mapping[str, Any]], list[FieldCause]]


@dataclasses.dataclass(frozen=True)
class ResourceSpec:
    """What the server knows of a resource beyond discovery: how its objects behave."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    subresources: frozenset[str] = frozenset()  # only "status" has semantics here
    generation: bool = False  # metadata.generation is tracked (CRDs, workloads, pods)
    return_deleted: bool = False  # DELETE answers the object (CRs, pods), else a Status
    field_labels: frozenset[str] = frozenset()  # selectable fields beyond metadata.name/namespace
    schema: Mapping[str, Any] | None = None  # openAPIV3Schema: pruning and defaults
    validate: Validator | None = None
    validate_status: Validator | None = None  # what a ``/status`` write must pass
    custom: bool = False  # a custom resource: no strategic merge patch (415)
    shortnames: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()

    @functools.cached_property
    def key(self) -> kmock.resource:
        """kmock's resource (cached: building one costs a slow Protocol isinstance check)."""
        return kmock.resource(self.group, self.version, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        """The resource as messages name it: ``configmaps``, ``leases.coordination.k8s.io``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def group_kind(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind


def _cel_cause(field: str, message: str, reason: str) -> FieldCause:
    """A failed CEL rule, worded as apiextensions-apiserver words it for each ``reason``."""
    if reason == "FieldValueForbidden":
        return FieldCause(field, reason, f"Forbidden: {message}")
    if reason == "FieldValueRequired":
        return FieldCause(field, reason, f"Required value: {message}")
    if reason == "FieldValueDuplicate":
        return FieldCause(field, reason, 'Duplicate value: "object"')
    return FieldCause(field, "FieldValueInvalid", f'Invalid value: "object": {message}')


_PREFIX_REASONS: Final = (
    ("Required value", "FieldValueRequired"), ("Unsupported value", "FieldValueNotSupported"),
    ("Too long", "FieldValueTooLong"), ("Too many", "FieldValueTooMany"),
    ("Forbidden", "FieldValueForbidden"), ("Duplicate value", "FieldValueDuplicate"),
)


def validate_policy(obj: Mapping[str, Any]) -> list[FieldCause]:
    """MailTLSPolicy validation by the operator's own CRD validator, as 422 causes."""
    cel = {(rule.field, rule.message): rule.reason for rule in crd.cel_rules()}
    causes = []
    for error in crd.validate_with_crd(obj):
        if (error.field, error.message) in cel:
            causes.append(_cel_cause(error.field, error.message, cel[error.field, error.message]))
            continue
        causes.append(_cause(error))
    return causes


def validate_policy_status(obj: Mapping[str, Any]) -> list[FieldCause]:
    """A ``/status`` write of a MailTLSPolicy, judged by the CRD's status schema."""
    status = obj.get("status")
    if status is None:
        return []
    return [_cause(error) for error in crd.status_errors(status)]


def _cause(error: crd.FieldError) -> FieldCause:
    reason = next((r for p, r in _PREFIX_REASONS if error.message.startswith(p)),
                  "FieldValueInvalid")
    return FieldCause(error.field, reason, error.message)


def mailtls_policy_spec() -> ResourceSpec:
    """``mailtls.io/v1alpha1/mailtlspolicies`` exactly as the CRD in ``crds/`` declares it."""
    doc = crd.load_crd()
    return ResourceSpec(
        crd.GROUP, crd.VERSION, crd.PLURAL, crd.KIND, namespaced=True,
        subresources=frozenset({"status"}), generation=True, return_deleted=True,
        schema=crd.version_schema(), validate=validate_policy,
        validate_status=validate_policy_status, custom=True,
        shortnames=frozenset(doc["spec"]["names"].get("shortNames", [])),
        categories=frozenset(doc["spec"]["names"].get("categories", [])),
    )


def standard_resources() -> list[ResourceSpec]:
    """Everything the operator, Kopf and the tests touch, declared like a small real cluster."""
    status = frozenset({"status"})
    workload = functools.partial(ResourceSpec, namespaced=True, subresources=status,
                                 generation=True)
    core_event_fields = frozenset({
        "involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
        "involvedObject.uid", "involvedObject.apiVersion", "reason", "type",
        "reportingComponent", "source",
    })
    return [
        ResourceSpec("", "v1", "namespaces", "Namespace", namespaced=False, subresources=status,
                     field_labels=frozenset({"status.phase"})),
        workload("", "v1", "pods", "Pod", return_deleted=True, shortnames=frozenset({"po"}),
                 field_labels=frozenset({"spec.nodeName", "status.phase", "status.podIP",
                                         "spec.serviceAccountName"})),
        ResourceSpec("", "v1", "configmaps", "ConfigMap", namespaced=True,
                     shortnames=frozenset({"cm"})),
        ResourceSpec("", "v1", "events", "Event", namespaced=True,
                     field_labels=core_event_fields),
        ResourceSpec("events.k8s.io", "v1", "events", "Event", namespaced=True,
                     field_labels=frozenset({"regarding.kind", "regarding.name",
                                             "regarding.namespace", "reason", "type"})),
        workload("apps", "v1", "deployments", "Deployment"),
        workload("apps", "v1", "statefulsets", "StatefulSet"),
        workload("apps", "v1", "replicasets", "ReplicaSet"),
        ResourceSpec("apiextensions.k8s.io", "v1", "customresourcedefinitions",
                     "CustomResourceDefinition", namespaced=False, subresources=status,
                     generation=True),
        ResourceSpec("kopf.dev", "v1", "kopfpeerings", "KopfPeering", namespaced=True,
                     generation=True, return_deleted=True),
        ResourceSpec("kopf.dev", "v1", "clusterkopfpeerings", "ClusterKopfPeering",
                     namespaced=False, generation=True, return_deleted=True),
        ResourceSpec("coordination.k8s.io", "v1", "leases", "Lease", namespaced=True),
        mailtls_policy_spec(),
    ]


# ------------------------------------------------------------------------------------ selectors

_KEY_RE = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_VALUE_RE = r"[-A-Za-z0-9_.]*"
_SET_REQ = re.compile(rf"\s*({_KEY_RE})\s+(in|notin)\s*\(([^()]*)\)\s*")
_CMP_REQ = re.compile(rf"\s*({_KEY_RE})\s*(==|=|!=)\s*({_VALUE_RE})\s*")
_NUM_REQ = re.compile(rf"\s*({_KEY_RE})\s*([<>])\s*(-?\d+)\s*")
_EXISTS_REQ = re.compile(rf"\s*(!?)\s*({_KEY_RE})\s*")

LabelMatcher = Callable[[Mapping[str, str]], bool]


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses: ``a in (x,y),b`` is two requirements."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            raise ValueError("unbalanced parentheses")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise ValueError("unbalanced parentheses")
    return [*parts, current]


def _requirement(text: str) -> LabelMatcher:
    if m := _SET_REQ.fullmatch(text):
        key, op = m[1], m[2]
        values = {v.strip() for v in m[3].split(",")}
        if not all(re.fullmatch(_VALUE_RE, v) for v in values):
            raise ValueError(f"invalid values in {text!r}")
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if m := _CMP_REQ.fullmatch(text):
        key, op, value = m[1], m[2], m[3]
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if m := _NUM_REQ.fullmatch(text):
        key, op, bound = m[1], m[2], int(m[3])

        def compare(labels: Mapping[str, str]) -> bool:
            raw = labels.get(key)
            if raw is None or not re.fullmatch(r"-?\d+", raw):
                return False
            return int(raw) > bound if op == ">" else int(raw) < bound
        return compare
    if m := _EXISTS_REQ.fullmatch(text):
        negated, key = bool(m[1]), m[2]
        return lambda labels: (key in labels) != negated
    raise ValueError(f"unable to parse requirement: {text!r}")


def parse_label_selector(text: str) -> LabelMatcher:
    """A label selector (``a=b``, ``a!=b``, ``a in (x,y)``, ``a notin (x)``, ``a``, ``!a``,
    ``a>1``) as a predicate over labels; requirements are ANDed. ValueError if malformed."""
    if not text.strip():
        return lambda labels: True
    requirements = [_requirement(part) for part in _split_top_level(text)]
    return lambda labels: all(req(labels) for req in requirements)


_FIELD_REQ = re.compile(r"\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*([^,]*?)\s*")
FieldMatcher = Callable[[Mapping[str, Any]], bool]


def _dotted(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return "" if value is None else str(value)


def parse_field_selector(text: str, allowed: Collection[str]) -> FieldMatcher:
    """A field selector over ``allowed`` dotted paths. ValueError names what is unsupported."""
    checks: list[tuple[str, bool, str]] = []
    for part in text.split(",") if text.strip() else []:
        m = _FIELD_REQ.fullmatch(part)
        if not m:
            raise ValueError(f"invalid selector: {part!r}")
        if m[1] not in allowed:
            raise ValueError(f"field label not supported: {m[1]}")
        checks.append((m[1], m[2] != "!=", m[3]))
    return lambda obj: all((_dotted(obj, f) == v) == eq for f, eq, v in checks)


# ------------------------------------------------------------------------------------- patching


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge, ``null`` deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


_MERGE: Final = "application/merge-patch+json"
_STRATEGIC: Final = "application/strategic-merge-patch+json"
_JSON_PATCH: Final = "application/json-patch+json"


def apply_patch(obj: Obj, body: Any, content_type: str, *, custom: bool = False) -> Obj:
    """The patched object, as the content type says; API errors as the server answers them.

    Custom resources have no Go struct to carry patch strategies, so the API server
    answers strategic merge patch on them with 415 (and lists what it accepts)."""
    media = content_type.split(";")[0].strip().lower()
    accepted = [_JSON_PATCH, _MERGE] if custom else [_JSON_PATCH, _MERGE, _STRATEGIC]
    if media not in accepted and media != "application/apply-patch+yaml":
        raise api_error(415, f'the body of the request was in an unknown format - accepted '
                             f'media types include: {", ".join(accepted)}, '
                             f'application/apply-patch+yaml')
    if media in (_MERGE, _STRATEGIC):
        # Strategic merge is merge here: its list-merge keys matter to no test of ours.
        if not isinstance(body, dict):
            raise api_error(400, "the patch is not a JSON object")
        patched = merge_patch(copy.deepcopy(obj), body)
    elif media == "application/json-patch+json":
        if not isinstance(body, list):
            raise api_error(400, "json patch must be a list of operations")
        try:
            patched = jsonpatch.apply_patch(copy.deepcopy(obj), body, in_place=False)
        except jsonpatch.JsonPatchTestFailed as e:
            raise api_error(422, f"the server rejected our request: {e}") from None
        except (jsonpatch.JsonPatchConflict, jsonpointer.JsonPointerException) as e:
            raise api_error(422, f"the server rejected our request: {e}") from None
        except (jsonpatch.InvalidJsonPatch, TypeError, KeyError) as e:
            raise api_error(400, f"invalid json patch: {e}") from None
    else:  # server-side apply: not emulated (see KNOWN_DIFFERENCES.md)
        raise api_error(415, "application/apply-patch+yaml is not supported by this emulation")
    if not isinstance(patched, dict):
        raise api_error(422, "the patched document is not an object")
    return patched


# ------------------------------------------------------------------------- structural schemas


def prune(value: Any, schema: Mapping[str, Any], path: str = "", *, root: bool = True) -> list[str]:
    """Drop fields the structural schema does not declare (as the API server prunes them);
    returns their paths for warnings or ``fieldValidation=Strict`` refusals."""
    pruned: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
            for key in list(value):
                if key not in props and not (root and key in ("apiVersion", "kind", "metadata")):
                    pruned.append(f"{path}.{key}".lstrip("."))
                    del value[key]
        for key, sub in (props or {}).items():
            if key in value and not (root and key == "metadata"):
                pruned += prune(value[key], sub, f"{path}.{key}", root=False)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            pruned += prune(item, schema["items"], f"{path}[{index}]", root=False)
    return pruned


def _field_validation(request: rendering.Request, pruned: list[str],
                      warnings: list[str]) -> None:
    """What the request's ``fieldValidation`` makes of pruned fields: refused (Strict),
    a Warning header each (Warn, the server's default) or nothing (Ignore)."""
    mode = request.params.get("fieldValidation", "Warn")
    if pruned and mode == "Strict":
        raise api_error(400, "strict decoding error: " + ", ".join(
            f'unknown field "{p}"' for p in pruned))
    if mode != "Ignore":
        warnings += [f'unknown field "{p}"' for p in pruned]


def apply_defaults(value: Any, schema: Mapping[str, Any]) -> None:
    """Fill absent fields that the schema gives a ``default``, recursively."""
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(value[key], sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for item in value:
            apply_defaults(item, schema["items"])


# ---------------------------------------------------------------------------------- request log


class ApiRequest(NamedTuple):
    """One resource request, the way RBAC sees it."""

    verb: str  # get list watch create update patch delete deletecollection
    group: str
    version: str
    resource: str
    subresource: str | None
    namespace: str | None
    name: str | None
    label_selector: str | None = None  # of a list or watch
    limit: int | None = None  # of a paged list


@dataclasses.dataclass(frozen=True)
class RequestFilter:
    """Selects requests; ``None`` matches anything, but ``subresource=None`` means "none"."""

    verbs: frozenset[str] | None = None
    group: str | None = None
    resource: str | None = None
    subresource: str | _AnyType | None = ANY
    namespace: str | None = None
    name: str | None = None

    def __call__(self, r: ApiRequest) -> bool:
        return ((self.verbs is None or r.verb in self.verbs)
                and (self.group is None or r.group == self.group)
                and (self.resource is None or r.resource == self.resource)
                and (self.subresource is ANY or r.subresource == self.subresource)
                and (self.namespace is None or r.namespace == self.namespace)
                and (self.name is None or r.name == self.name))


def _verbs(verb: str | Iterable[str] | None) -> frozenset[str] | None:
    return None if verb is None else frozenset({verb} if isinstance(verb, str) else verb)


@dataclasses.dataclass(eq=False)
class Fault:
    """An injected failure: matching requests wait ``delay`` s, then fail with ``status``
    (or, with no status, proceed normally) -- always before anything is stored."""

    match: RequestFilter
    status: int | None
    delay: float
    times: int | None  # None: forever
    message: str
    hits: int = 0

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times


# ---------------------------------------------------------------------------------------- watch


def _line(kind: str, obj: Mapping[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode() + b"\n"


class _Event:
    """A stored change: what watchers resuming from an older resourceVersion are sent."""

    __slots__ = ("_line", "kind", "obj", "old", "rv")

    def __init__(self, rv: int, kind: str, obj: Obj, old: Obj | None) -> None:
        self.rv, self.kind, self.obj, self.old = rv, kind, obj, old
        self._line: bytes | None = None

    def line(self) -> bytes:
        if self._line is None:
            self._line = _line(self.kind, self.obj)
        return self._line


@dataclasses.dataclass(frozen=True)
class _Stop:
    error: Obj | None = None  # an ERROR event's Status to send before closing


@dataclasses.dataclass(eq=False)
class _Watcher:
    matches: Callable[[Obj], bool]
    transport: asyncio.BaseTransport | None
    queue: asyncio.Queue[_Event | _Stop] = dataclasses.field(default_factory=asyncio.Queue)
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def render(self, event: _Event) -> bytes | None:
        """The event as this watcher's selectors see it: leaving the selection is DELETED."""
        now = self.matches(event.obj)
        if event.kind != "MODIFIED":
            return event.line() if now else None
        before = event.old is not None and self.matches(event.old)
        if now and before:
            return event.line()
        if now or before:
            return _line("ADDED" if now else "DELETED", event.obj)
        return None

    @property
    def alive(self) -> bool:
        return self.transport is None or not self.transport.is_closing()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _limit(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:  # answered 400 by the list itself
        return None


def _expired(since: int, oldest: int) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": f"too old resource version: {since} ({oldest})", "reason": "Expired",
            "code": 410}


# --------------------------------------------------------------------------------------- server


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock's path parser, taught the ``/api/v1/namespaces[/NAME[/status]]`` resource
    (kmock 0.8 takes it for a namespace prefix and fails with 500)."""
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[0] in ("api", "apis") and "namespaces" in parts[1:4]:
        index = parts.index("namespaces")
        group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
        rest = parts[index + 1:]
        if index == (2 if parts[0] == "api" else 3) and (
                len(rest) <= 1 or (len(rest) == 2 and rest[1] in ("status", "finalize"))):
            name = rest[0] if rest else None
            subresource = rest[1] if len(rest) == 2 else None
            return parsing.ParsedPath(group, version, "namespaces", None, name, subresource)
    try:
        return parsing.parse_path(path)
    except ValueError:
        return parsing.ParsedPath()


def _verb(method: str, params: Mapping[str, str], name: str | None) -> str:
    if method == "GET":
        return "watch" if params.get("watch") in ("true", "1") else "get" if name else "list"
    verbs = {"POST": "create", "PUT": "update", "PATCH": "patch"}
    if method in verbs:
        return verbs[method]
    if method == "DELETE":
        return "delete" if name else "deletecollection"
    return method.lower()


def _meta(obj: Mapping[str, Any]) -> Obj:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _owner_uids(obj: Mapping[str, Any]) -> set[str]:
    return {ref.get("uid") for ref in _meta(obj).get("ownerReferences") or []}


def _content(obj: Mapping[str, Any]) -> Obj:
    """What ``generation`` tracks: all but metadata and status (and the type fields)."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Equal but for resourceVersion and managedFields: a write that changes nothing."""
    def strip(obj: Mapping[str, Any]) -> Obj:
        meta = {k: v for k, v in _meta(obj).items()
                if k not in ("resourceVersion", "managedFields")}
        return {**obj, "metadata": meta}
    return strip(a) == strip(b)


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator with the API server's semantics for declared resources.

    Requests to declared resources are served here; everything else (discovery, ``/version``,
    undeclared paths) goes through kmock as before. kmock DSL reactions added by a test
    (``server['get', 'v1/pods'] << 503``) still take precedence, but kmock's request views
    (``len(server['get'])``) only see requests in flight: use :attr:`request_log` instead.

    In a test::

        server.inject_fault("create", "configmaps", status=500, times=2)   # before storage
        server.inject_fault(WRITE_VERBS, "configmaps", status=409)
        server.inject_fault("get", status=504, delay=3)                    # hang, then fail
        server.expire_watches("mailtls.io/v1alpha1/mailtlspolicies")       # ERROR 410 now
        server.compact()                                                   # 410 on resuming
        server.request_count("patch", "mailtlspolicies", subresource="status")
        server.response_log   # [(ApiRequest, http_code)], e.g. to see a 500 then a 200
        server.reset_log()
        await server.wait_until(lambda: server.get_object("v1/configmaps", "ns", "name"))
        server.seed("v1/pods", pod_with_status)   # arrange state as a controller left it
    """

    require_namespaces: bool = False  # refuse creates into namespaces that do not exist
    history_limit: int = 100_000  # watch events kept per resource (older ones "compacted")
    declare_standard: bool = True

    request_log: list[ApiRequest] = attrs.field(factory=list, init=False)
    response_log: list[tuple[ApiRequest, int]] = attrs.field(factory=list, init=False)
    nonresource_log: list[tuple[str, str]] = attrs.field(factory=list, init=False)
    faults: list[Fault] = attrs.field(factory=list, init=False)
    server_errors: list[BaseException] = attrs.field(factory=list, init=False)
    _specs: dict[kmock.resource, ResourceSpec] = attrs.field(factory=dict, init=False)
    _rv: int = attrs.field(default=0, init=False)
    _seq: int = attrs.field(default=0, init=False)
    _history: dict[kmock.resource, collections.deque[_Event]] = attrs.field(
        factory=lambda: collections.defaultdict(collections.deque), init=False)
    _compacted: dict[kmock.resource, int] = attrs.field(factory=dict, init=False)
    _watchers: dict[kmock.resource, set[_Watcher]] = attrs.field(
        factory=lambda: collections.defaultdict(set), init=False)
    _watch_counts: collections.Counter[kmock.resource] = attrs.field(
        factory=collections.Counter, init=False)
    _waiters: set[asyncio.Future[None]] = attrs.field(factory=set, init=False)
    _builtin_payloads: set[int] = attrs.field(factory=set, init=False)
    _closing: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _owners_seen: bool = attrs.field(default=False, init=False)  # no GC scans until needed

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._builtin_payloads = {id(payload) for payload in self._payloads}
        if self.declare_standard:
            for spec in standard_resources():
                self.declare(spec)
            for name in ("default", "kube-system", "kube-public"):
                self.seed("v1/namespaces", {"metadata": {"name": name}})
            self.seed("apiextensions.k8s.io/v1/customresourcedefinitions",
                      _established(crd.load_crd()))

    # ----------------------------------------------------------------------------- public API

    def declare(self, spec: ResourceSpec) -> None:
        """Serve a resource: discovery (via kmock) and the semantics above (here)."""
        self._specs[spec.key] = spec
        self.resources[spec.key] = kmock.ResourceInfo(
            kind=spec.kind, namespaced=spec.namespaced, singular=spec.kind.lower(),
            verbs=set(ALL_VERBS), shortnames=set(spec.shortnames),
            categories=set(spec.categories), subresources=set(spec.subresources))

    @property
    def specs(self) -> list[ResourceSpec]:
        return list(self._specs.values())

    def spec(self, resource: str) -> ResourceSpec:
        """A declared resource by ``v1/configmaps``, ``apps/v1/deployments`` or a unique plural."""
        wanted = kmock.resource(resource)
        found = [s for s in self._specs.values() if wanted.check(s.key)]
        if len(found) != 1:
            raise LookupError(f"{resource!r} names {len(found)} declared resources")
        return found[0]

    @property
    def in_flight(self) -> int:
        """Requests being handled now (a cancelled one leaves when its client disconnects)."""
        return len(self._requests)

    @property
    def resource_version(self) -> int:
        """The newest resourceVersion handed out (global across resources, as etcd's)."""
        return self._rv

    def get_object(self, resource: str, namespace: str | None, name: str) -> Obj | None:
        """The current object (a deep copy), or None if absent."""
        spec = self.spec(resource)
        obj = self._current((spec.key, namespace if spec.namespaced else None, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list_objects(self, resource: str, namespace: str | None = None) -> list[Obj]:
        """Current objects of a resource (deep copies), in the API server's order."""
        spec = self.spec(resource)
        objs = self._select(spec, lambda o: namespace in (None, _meta(o).get("namespace")))
        return copy.deepcopy(objs)

    def seed(self, resource: str, obj: Mapping[str, Any]) -> Obj:
        """Store an object as a controller would have left it: server metadata is set, status
        is kept, nothing is validated (an older CRD may have allowed it). Watchers see ADDED."""
        spec = self.spec(resource)
        new = copy.deepcopy(dict(obj))
        new.setdefault("apiVersion", spec.api_version)
        new.setdefault("kind", spec.kind)
        meta = new.setdefault("metadata", {})
        namespace = meta.get("namespace") if spec.namespaced else None
        if spec.namespaced and not namespace:
            raise ValueError(f"{resource} is namespaced: give metadata.namespace")
        meta.update(uid=meta.get("uid") or str(uuid.uuid4()),
                    creationTimestamp=meta.get("creationTimestamp") or _now())
        if spec.generation:
            meta.setdefault("generation", 1)
        if spec.schema is not None:
            apply_defaults(new, spec.schema)
        key = (spec.key, namespace, meta["name"])
        old = self._current(key)
        self._commit(spec, key, new, old, "MODIFIED" if old else "ADDED")
        return copy.deepcopy(new)

    def request_count(self, verb: str | Iterable[str] | None = None, resource: str | None = None,
                      *, subresource: str | _AnyType | None = ANY, group: str | None = None,
                      namespace: str | None = None, name: str | None = None) -> int:
        """How many logged requests match, e.g. ``request_count("patch", "mailtlspolicies",
        subresource="status")``; ``subresource=None`` counts main-resource requests only."""
        match = RequestFilter(_verbs(verb), group, resource, subresource, namespace, name)
        return sum(1 for r in self.request_log if match(r))

    def reset_log(self) -> None:
        """Forget logged requests (e.g. after setup, before the part a test measures)."""
        self.request_log.clear()
        self.response_log.clear()
        self.nonresource_log.clear()

    def inject_fault(self, verb: str | Iterable[str] | None = None, resource: str | None = None,
                     *, status: int | None = 500, delay: float = 0.0, times: int | None = 1,
                     subresource: str | _AnyType | None = ANY, group: str | None = None,
                     namespace: str | None = None, name: str | None = None,
                     message: str | None = None) -> Fault:
        """Make the next ``times`` matching requests fail with ``status`` after ``delay`` s,
        before anything is stored. ``status=None`` with a delay only slows them down; if the
        client gives up first, the request is cancelled and nothing is stored either.
        E.g. ``inject_fault(WRITE_VERBS, "configmaps", status=409, times=2)``."""
        fault = Fault(RequestFilter(_verbs(verb), group, resource, subresource, namespace, name),
                      status, delay, times, message or f"injected fault ({status})")
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    def compact(self, resource: str | None = None) -> None:
        """Forget the watch history up to now, as etcd compaction does: a watch or a list
        continuation from an older resourceVersion gets 410 Expired."""
        for spec in [self.spec(resource)] if resource else self._specs.values():
            self._history[spec.key].clear()
            self._compacted[spec.key] = self._rv

    def expire_watches(self, resource: str | None = None) -> int:
        """Compact, and end the open watch streams with an ERROR 410 event, as a real server
        does when a stream's position is gone. Returns how many streams were ended."""
        self.compact(resource)
        count = 0
        for spec in [self.spec(resource)] if resource else self._specs.values():
            for watcher in list(self._watchers[spec.key]):
                watcher.queue.put_nowait(_Stop(_expired(self._rv, self._rv + 1)))
                count += 1
        return count

    def watch_count(self, resource: str) -> int:
        """Watch requests ever accepted for a resource (not reset by :meth:`reset_log`)."""
        return self._watch_counts[self.spec(resource).key]

    def open_watch_count(self, resource: str) -> int:
        return sum(1 for w in self._watchers[self.spec(resource).key] if w.alive)

    async def wait_until(self, predicate: Callable[[], T | None], timeout: float = 5.0, *,
                         interval: float = 0.02) -> T:
        """Wait until ``predicate()`` is truthy; TimeoutError after ``timeout`` s. Returns its
        value. It is re-checked at once after every request and every stored change, and at
        least every ``interval`` s for predicates over state the server cannot see (e.g. the
        operator's own memory, changed in its thread)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while not (result := predicate()):
                    waiter = loop.create_future()
                    self._waiters.add(waiter)
                    timer = loop.call_later(interval, _wake, waiter)
                    try:
                        await waiter
                    finally:
                        timer.cancel()
                        self._waiters.discard(waiter)
                return result  # truthy, so not None
        except TimeoutError:
            raise TimeoutError(f"condition not met within {timeout} s: {predicate!r}") from None

    def notify(self) -> None:
        """Wake :meth:`wait_until` waiters to re-check (from the server's loop only)."""
        for waiter in self._waiters:
            _wake(waiter)

    async def close_streams(self, timeout: float = 2.0) -> None:
        """End open watches and pending fault delays, so that the HTTP server can stop at once
        (aiohttp otherwise waits up to 60 s for running handlers)."""
        self._closing.set()
        watchers = [w for ws in self._watchers.values() for w in ws]
        for watcher in watchers:
            watcher.queue.put_nowait(_Stop())
        if watchers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(w.done.wait() for w in watchers))

    # ------------------------------------------------------------------------ HTTP entry point

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """kmock's entry point, minus its quadratic bookkeeping: a request stays in
        ``_requests`` (scanned by every DSL match) only while it is in flight."""
        body = await raw_request.read()
        request = self._parse(raw_request, body)
        self._requests.append(request)
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            self._record(request)
            try:
                response = await self._handle(request)
                if self._is_resource(request):
                    self.response_log.append((self._api_request(request), response.status))
                return response
            except rendering.StreamingError as e:  # a DSL stream failed mid-way
                raw_response = e.args[0]
                raise (e.__cause__ or e) from None
        except Exception as e:
            expected = isinstance(e, kmock.KubernetesError | ConnectionError)
            if not expected:  # a bug here or in a test's reaction: fail the test at teardown
                self.server_errors.append(e)
                if self._errors:
                    self._errors[-1].append(e)
            if raw_response is not None and raw_response.prepared:
                await self._stream_error(e, raw_response)
                await raw_response.write_eof()
                return raw_response
            error_response = await self._render_error(e)
            if self._is_resource(request):
                self.response_log.append((self._api_request(request), error_response.status))
            return error_response
        finally:
            self._requests.remove(request)
            self.notify()

    def _parse(self, raw: aiohttp.web.BaseRequest, body: bytes) -> rendering.Request:
        text = body.decode("utf-8", errors="replace")
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        k8s = _parse_path(raw.path)
        resource = None if k8s.group is None else kmock.resource(
            group=k8s.group, version=k8s.version, plural=k8s.plural)
        method = enums.method(raw.method)
        self._seq += 1
        return rendering.Request(
            id=self._seq, raw_request=raw, url=raw.url, method=method, params=dict(raw.query),
            headers=dict(raw.headers), cookies=dict(raw.cookies), body=body, text=text, data=data,
            action=parsing.guess_k8s(k8s, method, dict(raw.query)), resource=resource,
            namespace=k8s.namespace, name=k8s.name, subresource=k8s.subresource)

    @staticmethod
    def _is_resource(request: rendering.Request) -> bool:
        r = request.resource
        return r is not None and r.version is not None and r.plural is not None

    @staticmethod
    def _api_request(request: rendering.Request) -> ApiRequest:
        assert request.resource is not None
        return ApiRequest(
            _verb(str(request.method.value), request.params, request.name),
            str(request.resource.group), str(request.resource.version),
            str(request.resource.plural), request.subresource, request.namespace, request.name,
            request.params.get("labelSelector"), _limit(request.params.get("limit")))

    def _record(self, request: rendering.Request) -> None:
        if self._is_resource(request):
            self.request_log.append(self._api_request(request))
        else:
            self.nonresource_log.append((str(request.method.value).lower(), request.url.path))
        self.notify()

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if not self._is_resource(request):
            return await apps.RawHandler._handle(self, request)  # discovery & co: kmock's own
        await self._apply_faults(self._api_request(request))
        for payload in self._user_payloads():
            if request in payload._source and not payload._disabled.is_set():
                try:
                    return await payload(request)
                except rendering.ReactionMismatchError:
                    payload._disabled.set()
                except NotImplementedError:
                    pass
        return await self._serve(request)

    def _user_payloads(self) -> list[kmock.Reaction]:
        """Reactions a test added, in kmock's priority order (kmock's own ones excluded)."""
        user = [p for p in self._payloads if id(p) not in self._builtin_payloads]
        return sorted(user, key=lambda p: tuple(-x for x in p.priorities))

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        """A clean ``Status`` for API errors (kmock adds a server traceback as details)."""
        if not isinstance(exc, kmock.KubernetesError):
            return await super()._render_error(exc)
        status: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": exc.message or "", "reason": exc.reason or "", "code": exc.status}
        if exc.details:
            status["details"] = exc.details
        return aiohttp.web.json_response(status, status=exc.status)

    async def _apply_faults(self, call: ApiRequest) -> None:
        fault = next((f for f in self.faults if not f.exhausted and f.match(call)), None)
        if fault is None:
            return
        fault.hits += 1
        if fault.delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), fault.delay)
            if self._closing.is_set():
                raise api_error(503, "the test API server is shutting down")
        if fault.status is not None:
            details = {"name": call.name, "group": call.group, "kind": call.resource}
            raise api_error(fault.status, fault.message, details=details)

    # ------------------------------------------------------------------------------- storage

    def _current(self, key: Key) -> Obj | None:
        if key not in self._objects:
            return None
        stored = self._objects[key]
        if stored.deleted:
            return None
        raw = stored.raw
        if not _meta(raw).get("resourceVersion"):  # put into .objects directly by a test
            raw = self._adopt(key, raw)
        return raw

    def _adopt(self, key: Key, raw: Obj) -> Obj:
        spec = self._specs.get(key[0])
        new = copy.deepcopy(raw)
        meta = new.setdefault("metadata", {})
        meta.setdefault("name", key[2])
        if key[1]:
            meta.setdefault("namespace", key[1])
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        if spec is not None and spec.generation:
            meta.setdefault("generation", 1)
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        self._objects[key].history[-1] = new
        return new

    def _live(self, spec: ResourceSpec | None = None) -> Iterator[tuple[ResourceSpec, Key, Obj]]:
        """Current objects of one declared resource, or of all: one pass over the store."""
        for key, stored in list(self._objects.items()):
            found = self._specs.get(key[0])
            if found is not None and (spec is None or found is spec) and not stored.deleted:
                raw = stored.raw
                adopted = raw if _meta(raw).get("resourceVersion") else self._adopt(key, raw)
                yield found, key, adopted

    def _select(self, spec: ResourceSpec, matches: Callable[[Obj], bool]) -> list[Obj]:
        """Matching objects in etcd's key order (namespace, then name)."""
        found = [obj for _, _, obj in self._live(spec) if matches(obj)]
        return sorted(found, key=lambda o: (_meta(o).get("namespace") or "", _meta(o)["name"]))

    def _commit(self, spec: ResourceSpec, key: Key, new: Obj, old: Obj | None, kind: str) -> None:
        self._owners_seen = self._owners_seen or bool(new["metadata"].get("ownerReferences"))
        self._rv += 1
        new["metadata"]["resourceVersion"] = str(self._rv)
        if key in self._objects:
            self._objects[key].history.append(new)
        else:
            self._objects[key] = new
        self._emit(spec, _Event(self._rv, kind, new, old))

    def _emit(self, spec: ResourceSpec, event: _Event) -> None:
        history = self._history[spec.key]
        history.append(event)
        while len(history) > self.history_limit:
            self._compacted[spec.key] = history.popleft().rv
        watchers = self._watchers[spec.key]
        for watcher in list(watchers):
            if watcher.alive:
                watcher.queue.put_nowait(event)
            else:
                watchers.discard(watcher)
                watcher.done.set()
        self.notify()

    def _delete_now(self, spec: ResourceSpec, key: Key, obj: Obj) -> Obj:
        """Remove an object for good: DELETED for watchers, then its orphans are collected."""
        final = self._remove(spec, key, obj)
        self._collect_garbage(_meta(obj).get("uid"))
        return final

    def _remove(self, spec: ResourceSpec, key: Key, obj: Obj) -> Obj:
        final = {**obj, "metadata": dict(_meta(obj))}
        self._rv += 1
        final["metadata"]["resourceVersion"] = str(self._rv)
        self._objects[key].delete()
        self._emit(spec, _Event(self._rv, "DELETED", final, obj))
        return final

    def _mark_deleted(self, spec: ResourceSpec, key: Key, obj: Obj) -> Obj:
        """Graceful deletion of an object with finalizers: deletionTimestamp, generation+1."""
        new = copy.deepcopy(obj)
        meta = new["metadata"]
        meta["deletionTimestamp"] = _now()
        meta["deletionGracePeriodSeconds"] = 0
        if meta.get("generation"):
            meta["generation"] += 1
        self._commit(spec, key, new, obj, "MODIFIED")
        return new

    def _collect_garbage(self, uid: str | None) -> None:
        """Delete dependents whose every owner is gone, transitively -- the garbage collector's
        background cascading deletion, done at once (a real cluster does it moments later)."""
        gone: list[str | None] = [uid] if uid and self._owners_seen else []
        while gone:
            owner = gone.pop()
            dependents = [(spec, key, obj) for spec, key, obj in self._live()
                          if owner in _owner_uids(obj)]
            if not dependents:
                continue
            alive = {_meta(obj).get("uid") for _, _, obj in self._live()}
            for spec, key, obj in dependents:
                meta = _meta(obj)
                if _owner_uids(obj) & alive:
                    continue
                if not meta.get("finalizers"):
                    self._remove(spec, key, obj)
                    gone.append(meta.get("uid"))
                elif not meta.get("deletionTimestamp"):
                    self._mark_deleted(spec, key, obj)

    # ------------------------------------------------------------------------------ semantics

    async def _serve(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        assert request.resource is not None
        spec = self._specs.get(request.resource)
        if spec is None:
            raise api_error(404, "the server could not find the requested resource")
        verb = _verb(str(request.method.value), request.params, request.name)
        if request.subresource is not None and (
                request.subresource not in spec.subresources or request.subresource != "status"):
            raise api_error(404, "the server could not find the requested resource")
        if request.subresource and verb not in ("get", "update", "patch"):
            raise api_error(405, f"{verb} is not supported on {spec.plural}/{request.subresource}")
        if not spec.namespaced and request.namespace is not None:
            raise api_error(404, "the server could not find the requested resource")
        if spec.namespaced and request.namespace is None and verb not in ("list", "watch"):
            raise api_error(405, f"{verb} of namespaced {spec.plural} needs a namespace in the URL")
        handlers = {"create": self._create, "get": self._get, "list": self._list,
                    "update": self._update, "patch": self._patch, "delete": self._delete,
                    "deletecollection": self._delete_collection}
        if verb == "watch":
            return await self._watch(spec, request)
        if verb not in handlers:
            raise api_error(405, f"the server does not allow this method on {spec.plural}")
        return handlers[verb](spec, request)

    def _key(self, spec: ResourceSpec, request: rendering.Request, name: str | None = None) -> Key:
        return (spec.key, request.namespace if spec.namespaced else None, str(name or request.name))

    @staticmethod
    def _details(spec: ResourceSpec, name: str | None) -> Obj:
        return {"name": name, "kind": spec.plural, **({"group": spec.group} if spec.group else {})}

    def _not_found(self, spec: ResourceSpec, name: str | None) -> kmock.KubernetesError:
        return api_error(404, f'{spec.group_resource} "{name}" not found',
                         details=self._details(spec, name))

    def _conflict(self, spec: ResourceSpec, name: str, why: str) -> kmock.KubernetesError:
        return api_error(409, f'Operation cannot be fulfilled on {spec.group_resource} "{name}": '
                              f"{why}", details=self._details(spec, name))

    def _invalid(self, spec: ResourceSpec, name: str,
                 causes: list[FieldCause]) -> kmock.KubernetesError:
        texts = [f"{c.field}: {c.message}" for c in causes]
        joined = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
        details = {"name": name, "group": spec.group, "kind": spec.kind,
                   "causes": [{"reason": c.reason, "message": c.message, "field": c.field}
                              for c in causes]}
        return api_error(422, f'{spec.group_kind} "{name}" is invalid: {joined}', details=details)

    @staticmethod
    def _body(request: rendering.Request) -> Obj:
        if not isinstance(request.data, dict):
            raise api_error(400, "the request body is not a JSON object")
        return copy.deepcopy(request.data)

    @staticmethod
    def _check_meta(obj: Obj) -> Obj:
        """ObjectMeta's types, as decoding it would enforce them (400, like the real decoder)."""
        meta = obj.get("metadata")
        string_maps = ("labels", "annotations")
        ok = isinstance(meta, dict) and all(
            isinstance(meta.get(f), str | None) for f in ("name", "generateName", "namespace")
        ) and all(
            meta.get(f) is None or (isinstance(meta[f], dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in meta[f].items()))
            for f in string_maps
        ) and (meta.get("finalizers") is None or (isinstance(meta["finalizers"], list) and all(
            isinstance(f, str) for f in meta["finalizers"]))
        ) and (meta.get("ownerReferences") is None or (
            isinstance(meta["ownerReferences"], list)
            and all(isinstance(r, dict) for r in meta["ownerReferences"])))
        if not ok:
            raise api_error(400, "metadata: cannot unmarshal into ObjectMeta: a field has the "
                                 "wrong type")
        assert isinstance(meta, dict)
        return meta

    def _check_types(self, spec: ResourceSpec, obj: Obj) -> None:
        """Type fields, if given, must be the resource's own; if absent, they are filled."""
        for field, expected in (("apiVersion", spec.api_version), ("kind", spec.kind)):
            if obj.get(field) not in (None, expected):
                raise api_error(400, f"the {field} in the data ({obj[field]}) does not match "
                                     f"the expected {field} ({expected})")
            obj[field] = expected

    def _admit(self, spec: ResourceSpec, request: rendering.Request, obj: Obj,
               old: Obj | None, warnings: list[str]) -> None:
        """Prune, default and validate as the API server does for a structural schema.
        Validation ratchets: an update that leaves the spec alone is not re-validated."""
        if spec.schema is not None:
            _field_validation(request, prune(obj, spec.schema), warnings)
            apply_defaults(obj, spec.schema)
        if spec.validate is not None and (old is None or _content(old) != _content(obj)):
            causes = spec.validate(obj)
            if causes:
                raise self._invalid(spec, _meta(obj).get("name", ""), causes)

    def _admit_status(self, spec: ResourceSpec, request: rendering.Request, obj: Obj,
                      old: Obj, warnings: list[str]) -> None:
        """A ``/status`` write: pruned by the status schema (unknown fields dropped with a
        warning, refused with ``fieldValidation=Strict``) and validated by it -- a real
        server answers 422 Invalid naming each field.  Ratcheting: a status left as it
        was is not re-validated."""
        status_schema = (spec.schema or {}).get("properties", {}).get("status")
        if isinstance(status_schema, Mapping) and isinstance(obj.get("status"), dict):
            _field_validation(
                request, prune(obj["status"], status_schema, "status", root=False), warnings)
        if spec.validate_status is not None and obj.get("status") != old.get("status"):
            causes = spec.validate_status(obj)
            if causes:
                raise self._invalid(spec, _meta(obj).get("name", ""), causes)

    @staticmethod
    def _respond(obj: Obj, status: int = 200, warnings: Iterable[str] = ()) -> aiohttp.web.Response:
        response = aiohttp.web.json_response(obj, status=status)
        for warning in warnings:
            text = warning.replace("\\", "\\\\").replace('"', '\\"')
            response.headers.add("Warning", f'299 - "{text}"')
        return response

    def _create(self, spec: ResourceSpec, request: rendering.Request) -> aiohttp.web.Response:
        obj = self._body(request)
        self._check_types(spec, obj)
        obj.setdefault("metadata", {})
        meta = self._check_meta(obj)
        if meta.get("resourceVersion"):
            raise api_error(400, "resourceVersion should not be set on objects to be created")
        if spec.namespaced:
            if meta.get("namespace") not in (None, "", request.namespace):
                raise api_error(400, "the namespace of the provided object does not match the "
                                     "namespace sent on the request")
            meta["namespace"] = request.namespace
            if self.require_namespaces and self._current(
                    (kmock.resource("", "v1", "namespaces"), None, str(request.namespace))) is None:
                raise self._not_found(self.spec("v1/namespaces"), request.namespace)
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(random.choices(_GENERATE_CHARS, k=5))
        name = meta.get("name")
        if not name:
            raise self._invalid(spec, "", [FieldCause(
                "metadata.name", "FieldValueRequired",
                "Required value: name or generateName is required")])
        pattern = _LABEL if spec.plural == "namespaces" else _SUBDOMAIN
        if not re.fullmatch(pattern, name) or len(name) > (63 if pattern is _LABEL else 253):
            raise self._invalid(spec, name, [FieldCause(
                "metadata.name", "FieldValueInvalid",
                f'Invalid value: "{name}": a lowercase RFC 1123 name must consist of lower case '
                f"alphanumeric characters, '-' or '.', and must start and end with an "
                f"alphanumeric character (regex used for validation is '{pattern}')")])
        key = self._key(spec, request, name)
        if self._current(key) is not None:
            raise api_error(409, f'{spec.group_resource} "{name}" already exists',
                            reason="AlreadyExists", details=self._details(spec, name))
        for field in _SERVER_OWNED_META:
            meta.pop(field, None)
        if "status" in spec.subresources:
            obj.pop("status", None)
        warnings: list[str] = []
        self._admit(spec, request, obj, None, warnings)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now())
        if spec.generation:
            meta["generation"] = 1
        self._commit(spec, key, obj, None, "ADDED")
        return self._respond(obj, 201, warnings)

    def _get(self, spec: ResourceSpec, request: rendering.Request) -> aiohttp.web.Response:
        obj = self._current(self._key(spec, request))
        if obj is None:
            raise self._not_found(spec, request.name)
        return self._respond(obj)

    def _matcher(self, spec: ResourceSpec, request: rendering.Request) -> Callable[[Obj], bool]:
        """Namespace of the URL, name of the URL (watch on one object), and both selectors."""
        params = request.params
        try:
            labels = parse_label_selector(params.get("labelSelector", ""))
            fields = parse_field_selector(
                params.get("fieldSelector", ""),
                {"metadata.name", "metadata.namespace"} | spec.field_labels)
        except ValueError as e:
            raise api_error(400, f"unable to parse requirement: {e}") from None
        namespace, name = request.namespace, request.name

        def matches(obj: Obj) -> bool:
            meta = _meta(obj)
            return ((namespace is None or meta.get("namespace") == namespace)
                    and (name is None or meta.get("name") == name)
                    and labels(meta.get("labels") or {}) and fields(obj))
        return matches

    def _list(self, spec: ResourceSpec, request: rendering.Request) -> aiohttp.web.Response:
        items = self._select(spec, self._matcher(spec, request))
        list_rv, meta = self._rv, dict[str, Any]()
        token = request.params.get("continue")
        if token:
            try:
                state = json.loads(base64.urlsafe_b64decode(token))
                list_rv, after = int(state["rv"]), (str(state["after"][0]), str(state["after"][1]))
            except (ValueError, KeyError, TypeError, IndexError):
                raise api_error(400, "continue key is not valid") from None
            if list_rv < self._compacted.get(spec.key, 0):
                raise api_error(410, "The provided continue parameter is too old to display a "
                                     "consistent list result.")
            items = [o for o in items
                     if ((_meta(o).get("namespace") or ""), _meta(o)["name"]) > after]
        try:
            limit = int(request.params.get("limit") or 0)
        except ValueError:
            raise api_error(400, "limit: Invalid value: must be an integer") from None
        if 0 < limit < len(items):
            last = items[limit - 1]
            position = [_meta(last).get("namespace") or "", _meta(last)["name"]]
            meta["continue"] = base64.urlsafe_b64encode(
                json.dumps({"rv": list_rv, "after": position}).encode()).decode()
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return self._respond({"apiVersion": spec.api_version, "kind": f"{spec.kind}List",
                              "metadata": {"resourceVersion": str(list_rv), **meta},
                              "items": items})

    def _write(self, spec: ResourceSpec, request: rendering.Request, old: Obj,
               proposed: Obj) -> aiohttp.web.Response:
        """The shared tail of PUT and PATCH: concurrency, isolation, generation, no-ops."""
        name = _meta(old)["name"]
        stated_rv = self._check_meta(proposed).get("resourceVersion")
        if stated_rv and stated_rv != _meta(old)["resourceVersion"]:
            raise self._conflict(spec, name, "the object has been modified; please apply your "
                                             "changes to the latest version and try again")
        warnings: list[str] = []
        if request.subresource == "status":
            new = copy.deepcopy(old)  # only status changes, whatever else was sent
            if "status" in proposed:
                new["status"] = proposed["status"]
            else:
                new.pop("status", None)
            self._admit_status(spec, request, new, old, warnings)
        else:
            new = proposed
            self._check_types(spec, new)
            meta = new["metadata"]
            for field in (*_SERVER_OWNED_META, "name", "namespace"):
                if field in _meta(old):
                    meta[field] = _meta(old)[field]
                else:
                    meta.pop(field, None)
            if "status" in spec.subresources:
                if "status" in old:
                    new["status"] = old["status"]
                else:
                    new.pop("status", None)
            added = set(meta.get("finalizers") or []) - set(_meta(old).get("finalizers") or [])
            if _meta(old).get("deletionTimestamp") and added:
                raise self._invalid(spec, name, [FieldCause(
                    "metadata.finalizers", "FieldValueForbidden",
                    f"Forbidden: no new finalizers can be added if the object is being deleted, "
                    f"found new finalizers {sorted(added)!r}")])
            self._admit(spec, request, new, old, warnings)
            if spec.generation and _content(new) != _content(old):
                meta["generation"] = int(_meta(old).get("generation") or 1) + 1
        if _same(new, old):
            return self._respond(old, 200, warnings)
        key = self._key(spec, request, name)
        if _meta(new).get("deletionTimestamp") and not _meta(new).get("finalizers"):
            # The last finalizer gone: the update *is* the deletion (one DELETED event).
            return self._respond(self._delete_now(spec, key, new), 200, warnings)
        self._commit(spec, key, new, old, "MODIFIED")
        return self._respond(new, 200, warnings)

    def _update(self, spec: ResourceSpec, request: rendering.Request) -> aiohttp.web.Response:
        proposed = self._body(request)
        if _meta(proposed).get("name") not in (None, request.name):
            raise api_error(400, f"the name of the object ({_meta(proposed)['name']}) does not "
                                 f"match the name on the URL ({request.name})")
        old = self._current(self._key(spec, request))
        if old is None:
            raise self._not_found(spec, request.name)
        return self._write(spec, request, old, proposed)

    def _patch(self, spec: ResourceSpec, request: rendering.Request) -> aiohttp.web.Response:
        old = self._current(self._key(spec, request))
        if old is None:
            raise self._not_found(spec, request.name)
        content_type = request.headers.get("Content-Type", "")
        patched = apply_patch(old, request.data, content_type, custom=spec.custom)
        # A patch that leaves resourceVersion as it was is unconditional; one that sets it
        # (merge patch, or JSON patch "replace") is a precondition, as on a real server.
        return self._write(spec, request, old, patched)

    def _delete(self, spec: ResourceSpec, request: rendering.Request) -> aiohttp.web.Response:
        key = self._key(spec, request)
        old = self._current(key)
        if old is None:
            raise self._not_found(spec, request.name)
        options = request.data if isinstance(request.data, dict) else {}
        preconditions = options.get("preconditions") or {}
        for field, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            wanted = preconditions.get(field)
            if wanted and wanted != _meta(old).get(field):
                raise self._conflict(spec, str(request.name), f"Precondition failed: {label} in "
                                     f"precondition: {wanted}, {label} in object meta: "
                                     f"{_meta(old).get(field)}")
        meta = _meta(old)
        if meta.get("finalizers") or spec.return_deleted:
            return self._respond(self._delete_one(spec, key, old))
        self._delete_one(spec, key, old)
        return self._respond({"kind": "Status", "apiVersion": "v1", "metadata": {},
                              "status": "Success", "details": {
                                  **self._details(spec, meta["name"]), "uid": meta.get("uid")}})

    def _delete_one(self, spec: ResourceSpec, key: Key, old: Obj) -> Obj:
        """Delete now, or only mark for deletion while finalizers remain; the object after."""
        meta = _meta(old)
        if meta.get("finalizers"):
            return old if meta.get("deletionTimestamp") else self._mark_deleted(spec, key, old)
        return self._delete_now(spec, key, old)

    def _delete_collection(self, spec: ResourceSpec,
                           request: rendering.Request) -> aiohttp.web.Response:
        items = [self._delete_one(spec, self._key(spec, request, _meta(obj)["name"]), obj)
                 for obj in self._select(spec, self._matcher(spec, request))]
        return self._respond({"apiVersion": spec.api_version, "kind": f"{spec.kind}List",
                              "metadata": {"resourceVersion": str(self._rv)}, "items": items})

    async def _watch(self, spec: ResourceSpec,
                     request: rendering.Request) -> aiohttp.web.StreamResponse:
        """Initial state or history since ``resourceVersion``, then live changes, all filtered;
        ends after ``timeoutSeconds``, on :meth:`expire_watches`, or at shutdown."""
        params = request.params
        raw = request._raw_request
        assert raw is not None
        watcher = _Watcher(self._matcher(spec, request), raw.transport)
        since = params.get("resourceVersion") or "0"
        chunks: list[bytes] = []
        error: Obj | None = None
        if since == "0" or params.get("sendInitialEvents") == "true":
            chunks += [_line("ADDED", obj) for obj in self._select(spec, watcher.matches)]
            if params.get("sendInitialEvents") == "true":
                chunks.append(_line("BOOKMARK", {
                    "kind": spec.kind, "apiVersion": spec.api_version, "metadata": {
                        "resourceVersion": str(self._rv),
                        "annotations": {"k8s.io/initial-events-end": "true"}}}))
        else:
            try:
                start = int(since)
            except ValueError:
                raise api_error(400, f"resourceVersion: Invalid value: {since!r}") from None
            if start < self._compacted.get(spec.key, 0):
                error = _expired(start, self._compacted[spec.key] + 1)
            else:
                rendered = (watcher.render(e) for e in self._history[spec.key] if e.rv > start)
                chunks += [line for line in rendered if line]
        try:
            timeout = float(params.get("timeoutSeconds") or 0)
        except ValueError:
            raise api_error(400, "timeoutSeconds: Invalid value: must be a number") from None
        deadline = asyncio.get_running_loop().time() + timeout if timeout > 0 else None
        if error is None:
            self._watchers[spec.key].add(watcher)  # synchronously after the snapshot: no gap
        self._watch_counts[spec.key] += 1
        self.notify()
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            await response.prepare(raw)
            if chunks:
                await response.write(b"".join(chunks))
            if error is not None:
                await response.write(_line("ERROR", error))
            while error is None:
                try:
                    async with asyncio.timeout_at(deadline):
                        items = [await watcher.queue.get()]
                except TimeoutError:
                    break
                while not watcher.queue.empty():
                    items.append(watcher.queue.get_nowait())
                stop = next((i for i in items if isinstance(i, _Stop)), None)
                events = items[:items.index(stop)] if stop is not None else items
                lines = [watcher.render(e) for e in events if isinstance(e, _Event)]
                if stop is not None and stop.error is not None:
                    lines.append(_line("ERROR", stop.error))
                if any(lines):
                    await response.write(b"".join(line for line in lines if line))
                if stop is not None:
                    break
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away
        finally:
            self._watchers[spec.key].discard(watcher)
            watcher.done.set()
        return response


def _established(doc: Mapping[str, Any]) -> Obj:
    """The CRD as the API server shows it once accepted."""
    obj = copy.deepcopy(dict(doc))
    obj["status"] = {
        "acceptedNames": obj["spec"]["names"],
        "storedVersions": [v["name"] for v in obj["spec"]["versions"] if v.get("storage")],
        "conditions": [{"type": t, "status": "True", "reason": r, "lastTransitionTime": _now()}
                       for t, r in (("NamesAccepted", "NoConflicts"),
                                    ("Established", "InitialNamesAccepted"))],
    }
    return obj


# ------------------------------------------------------------------------------------ operator

LOGIN_HANDLER_ID: Final = "tests-integration-apiserver-login"


RunOperator = Callable[..., contextlib.AbstractAsyncContextManager["RunningOperator"]]


def fast_settings() -> kopf.OperatorSettings:
    """Kopf settings that keep tests fast (measured in kmock-notes): no peering, no CRD
    scanning, short backoffs and timeouts."""
    settings = kopf.OperatorSettings()
    settings.peering.standalone = True
    settings.scanning.disabled = True
    settings.networking.error_backoffs = [0.1, 0.2, 0.5]
    settings.networking.request_timeout = 5
    settings.watching.connect_timeout = 2
    settings.queueing.idle_timeout = 0.5
    settings.queueing.exit_timeout = 1
    return settings


def watched_resources(registry: kopf.OperatorRegistry, server: ApiServer) -> list[ResourceSpec]:
    """The declared resources Kopf will watch for this registry: what it has handlers for."""
    selectors = (registry._indexing.get_all_selectors() | registry._watching.get_all_selectors()
                 | registry._spawning.get_all_selectors() | registry._changing.get_all_selectors())
    found = []
    for spec in server.specs:
        resource = kopf.Resource(spec.group, spec.version, spec.plural, kind=spec.kind,
                                 namespaced=spec.namespaced, subresources=spec.subresources,
                                 verbs=ALL_VERBS)
        if any(selector.check(resource) for selector in selectors):
            found.append(spec)
    return found


def _set_login(registry: kopf.OperatorRegistry, url: str | None) -> None:
    """(Re)point the registry at this server: one login handler of ours, replaced per run so
    that a registry shared between tests never keeps a dead URL."""
    handlers = registry._activities._handlers
    handlers[:] = [h for h in handlers if h.id != LOGIN_HANDLER_ID]
    if url is not None:
        @kopf.on.login(registry=registry, id=LOGIN_HANDLER_ID)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=url, default_namespace="default")


@dataclasses.dataclass
class RunningOperator:
    """A Kopf operator running in its own thread and event loop, against an :class:`ApiServer`."""

    thread: threading.Thread
    stop_flag: threading.Event
    ready_flag: threading.Event
    settings: kopf.OperatorSettings
    memo: Any
    watched: list[ResourceSpec]
    startup_seconds: float = math.nan
    errors: list[BaseException] = dataclasses.field(default_factory=list)


@contextlib.asynccontextmanager
async def run_operator(server: ApiServer, registry: kopf.OperatorRegistry, *,
                       memo: Any = None, settings: kopf.OperatorSettings | None = None,
                       namespaces: Collection[str] = (), startup_timeout: float = 10.0,
                       stop_timeout: float = 10.0) -> AsyncIterator[RunningOperator]:
    """Run ``registry`` as an operator (cluster-wide, or in ``namespaces``) until the block
    ends; the block starts only once every resource it handles is being watched, so objects
    created in it are seen exactly once. Stopped in any case; its crash fails the test."""
    loop = asyncio.get_running_loop()
    settings = settings if settings is not None else fast_settings()
    watched = watched_resources(registry, server)
    before = {spec.key: server._watch_counts[spec.key] for spec in watched}
    stop_flag, ready_flag = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(kopf.operator(
                registry=registry, settings=settings, standalone=True, memo=memo,
                clusterwide=not namespaces, namespaces=list(namespaces),
                stop_flag=stop_flag, ready_flag=ready_flag, **operator_options()))
        except BaseException as e:  # reported in the test, not lost in the thread
            errors.append(e)
        finally:
            with contextlib.suppress(RuntimeError):  # the test loop may be closed already
                loop.call_soon_threadsafe(server.notify)

    thread = threading.Thread(target=target, name="kopf-operator", daemon=True)
    running = RunningOperator(thread, stop_flag, ready_flag, settings, memo, watched,
                              errors=errors)

    def ready() -> bool:
        watching = all(server._watch_counts[spec.key] > before[spec.key] for spec in watched)
        return (ready_flag.is_set() and watching) or not thread.is_alive()

    _set_login(registry, str(server.url).rstrip("/"))
    started = loop.time()
    running.thread.start()
    try:
        await server.wait_until(ready, startup_timeout)
        if running.errors or not running.thread.is_alive():
            raise RuntimeError(f"the operator died at startup: {running.errors!r}")
        running.startup_seconds = loop.time() - started
        yield running
    finally:
        running.stop_flag.set()
        await asyncio.to_thread(running.thread.join, stop_timeout)
        _set_login(registry, None)
        if running.thread.is_alive():
            raise RuntimeError(f"the operator did not stop within {stop_timeout} s")
    if running.errors:
        raise RuntimeError("the operator crashed") from running.errors[0]
