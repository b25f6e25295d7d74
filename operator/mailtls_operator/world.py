"""The operator's in-memory index of the world: policies, Postfix pods, our ConfigMaps.

Fed by watch events (and one list at start-up), read by the per-instance
workers.  Level-based: a worker never asks "what changed?", only "what is
there now?".  Each policy is validated once per (uid, generation, spec digest):
re-validating 10,000 policies on every event would cost seconds, and an
object's status write (which does not change the spec) costs nothing here.
No Kubernetes imports: everything is plain dicts, so it is tested directly.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .crd import FieldError
from .crd.meta import generation_of, name_of, namespace_of
from .policy import DEFAULT_MAX_EXCEPTION, Policy, PolicyInvalid, load_policy, spec_hash

INSTANCE_LABEL = "mailtls.io/instance"
ANN_STRATEGY = "mailtls.io/strategy"
ANN_CONTAINER = "mailtls.io/container"
ANN_MAP_PATH = "mailtls.io/map-path"
ANN_MAP_TYPE = "mailtls.io/map-type"
ANN_RELOAD = "mailtls.io/reload"
"""``"true"``: run ``postfix reload`` after each swap even for indexed tables."""
ANN_APPLIED = "mailtls.io/applied-revision"
ANN_TEMPLATE_REVISION = "mailtls.io/revision"

InstanceKey = tuple[str, str]  # (namespace, instance name)


@dataclass(slots=True)
class PolicyRecord:
    """A MailTLSPolicy as last seen, with the verdict of the model.

    Kept for every policy for the operator's lifetime, so it holds only what the
    workers and the status need: not the object's spec (the model has it), and its
    status with shared strings (see :func:`shared`)."""

    namespace: str
    name: str
    uid: str
    generation: int
    policy: Policy | None
    errors: Sequence[FieldError]
    status: dict[str, Any]
    digest: bytes = b""
    """:func:`~.policy.spec_hash` of the spec the verdict was made on."""
    named: tuple[str, ...] = ()
    """``spec.instances`` as written (also for a refused spec: it still names where
    its status belongs)."""
    stale: bool = False
    """``policy`` is the last good generation, kept in the tables while the current
    one is refused (bad input changes nothing)."""
    resource_version: str = ""
    ref: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.ref = self.policy.ref if self.policy is not None and \
            self.policy.namespace == self.namespace and self.policy.name == self.name \
            else f"{self.namespace}/{self.name}"

    def instances(self) -> tuple[str, ...]:
        return self.named


def shared(value: Any) -> Any:
    """A copy of a decoded JSON value whose keys and short strings are interned.

    Each decoded watch event brings its own copy of every key ("type", "reason",
    ...) and of values that 10,000 policies have in common (a condition's reason,
    the message "relay: 2/2 pods verified revision ...", a timestamp).  Interned,
    each is stored once, not once per policy."""
    if isinstance(value, Mapping):
        return {sys.intern(str(k)): shared(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [shared(v) for v in value]
    if type(value) is str and len(value) <= _SHARED_MAX:
        return sys.intern(value)
    return value


_SHARED_MAX = 256
_NO_ERRORS: tuple[FieldError, ...] = ()


@dataclass
class PodRecord:
    """A Postfix pod: one member of an instance."""

    namespace: str
    name: str
    instance: str
    uid: str
    ready: bool
    annotations: dict[str, str]
    owners: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> InstanceKey:
        return (self.namespace, self.instance)

    def annotation(self, name: str, default: str) -> str:
        return self.annotations.get(name) or default


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def pod_is_ready(obj: Mapping[str, Any]) -> bool:
    """Running, Ready and not being deleted: the only pods a rollout may touch."""
    if _meta(obj).get("deletionTimestamp"):
        return False
    status = obj.get("status") or {}
    if status.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in status.get("conditions") or [])


class World:
    """Everything the workers need, indexed for O(1) updates and per-namespace reads."""

    def __init__(self, *, clock: Callable[[], datetime],
                 max_exception: timedelta = DEFAULT_MAX_EXCEPTION) -> None:
        self.clock = clock
        self.max_exception = max_exception
        self.policies: dict[str, dict[str, PolicyRecord]] = {}  # ns -> name -> record
        self.pods: dict[tuple[str, str], PodRecord] = {}
        self.configmaps: dict[tuple[str, str], dict[str, Any]] = {}
        # annotations we wrote to a pod whose watch echo has not arrived yet: (uid, values)
        self._written: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
        self.validations = 0
        # reference counts, so instance discovery is O(1) per event, not O(policies)
        self._named: Counter[InstanceKey] = Counter()
        self._with_pods: Counter[InstanceKey] = Counter()

    # ------------------------------------------------------------------ policies

    def _verdict(self, obj: Mapping[str, Any], old: PolicyRecord | None, uid: str,
                 generation: int, digest: bytes) -> Policy | list[FieldError]:
        """The model's verdict: the recorded one while uid, generation and spec are the
        same (a status write, a restart's replay), else a fresh validation."""
        if old is not None and (old.uid, old.generation, old.digest) == (uid, generation,
                                                                          digest):
            if old.errors:
                return list(old.errors)
            if old.policy is not None:
                return old.policy
        self.validations += 1
        try:
            return load_policy(obj, now=self.clock(), max_exception=self.max_exception)
        except PolicyInvalid as exc:
            return exc.errors

    def holds(self, namespace: str, name: str, resource_version: str) -> bool:
        """Is exactly this version of the policy recorded already?  (A restart lists every
        policy itself, then Kopf replays each one: those events change nothing.)"""
        rec = self.policies.get(namespace, {}).get(name)
        return rec is not None and bool(resource_version) and \
            rec.resource_version == resource_version

    def upsert_policy(self, obj: Mapping[str, Any]) -> set[InstanceKey]:
        """Record a policy; return the instances whose table input changed."""
        meta = _meta(obj)
        # never str()/int() of what a watch hands over: a 5,000-digit generation or a
        # null namespace is refused by the model (a record with errors), not raised here
        ns, name = namespace_of(meta), name_of(meta)
        old = self.policies.get(ns, {}).get(name)
        spec = obj.get("spec")
        uid = raw_uid if isinstance(raw_uid := meta.get("uid"), str) else ""
        generation = generation_of(meta)
        digest = spec_hash(spec)
        verdict = self._verdict(obj, old, uid, generation, digest)
        last_good = old.policy if old is not None and old.uid == uid else None
        named = spec.get("instances") if isinstance(spec, Mapping) else None
        rec = PolicyRecord(
            namespace=sys.intern(ns), name=name, uid=uid, generation=generation,
            digest=digest,
            policy=verdict if isinstance(verdict, Policy) else last_good,
            errors=verdict if isinstance(verdict, list) else _NO_ERRORS,
            status=shared(obj.get("status") or {}),
            named=tuple(sys.intern(i) for i in named if isinstance(i, str))
            if isinstance(named, list) else (),
            stale=isinstance(verdict, list) and last_good is not None,
            resource_version=rv if isinstance(rv := meta.get("resourceVersion"), str) else "",
        )
        self.policies.setdefault(ns, {})[name] = rec
        self._count_named(old, -1)
        self._count_named(rec, +1)
        if old is not None and old.policy == rec.policy and old.errors == rec.errors \
                and old.generation == rec.generation:
            return set()  # e.g. our own status write: nothing to re-render
        return self._affected(ns, old) | self._affected(ns, rec)

    def delete_policy(self, namespace: str, name: str) -> set[InstanceKey]:
        old = self.policies.get(namespace, {}).pop(name, None)
        self._count_named(old, -1)
        return self._affected(namespace, old) if old else set()

    def _count_named(self, rec: PolicyRecord | None, delta: int) -> None:
        if rec is None:
            return
        for inst in rec.instances():
            self._named[(rec.namespace, inst)] += delta
            if self._named[(rec.namespace, inst)] <= 0:
                del self._named[(rec.namespace, inst)]

    def _affected(self, ns: str, rec: PolicyRecord | None) -> set[InstanceKey]:
        if rec is None:
            return set()
        named = rec.instances()
        if named:
            return {(ns, i) for i in named}
        return {k for k in self.instances() if k[0] == ns}

    def records(self, namespace: str | None = None) -> Iterable[PolicyRecord]:
        if namespace is not None:
            return list(self.policies.get(namespace, {}).values())
        return [r for by_name in self.policies.values() for r in by_name.values()]

    def policies_for(self, key: InstanceKey) -> list[Policy]:
        """Valid policies of the instance's namespace that target it (audit ones included:
        the renderer leaves them out of the table, status still needs them)."""
        ns, inst = key
        return [r.policy for r in self.policies.get(ns, {}).values()
                if r.policy is not None and r.policy.targets(inst)]

    # ---------------------------------------------------------------------- pods

    def upsert_pod(self, obj: Mapping[str, Any]) -> set[InstanceKey]:
        meta = _meta(obj)
        ns, name = namespace_of(meta), name_of(meta)
        instance = (meta.get("labels") or {}).get(INSTANCE_LABEL)
        old = self.pods.get((ns, name))
        if not instance:
            return self.delete_pod(ns, name)
        uid = str(meta.get("uid", ""))
        annotations = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}
        rec = PodRecord(namespace=ns, name=name, instance=str(instance), uid=uid,
                        ready=pod_is_ready(obj),
                        annotations=self._with_written((ns, name), uid, annotations),
                        owners=list(meta.get("ownerReferences") or []))
        self.pods[(ns, name)] = rec
        self._count_pod(old, -1)
        self._count_pod(rec, +1)
        changed = old is None or (old.ready, old.uid, old.instance, old.annotations) != (
            rec.ready, rec.uid, rec.instance, rec.annotations)
        keys = {rec.key} | ({old.key} if old else set())
        return keys if changed else set()

    def wrote_pod_annotations(self, namespace: str, name: str,
                              annotations: dict[str, str]) -> None:
        """Record annotations just written to a pod, before their watch echo arrives.

        A watch event sent before the write (a readiness change, our own earlier patch)
        can arrive after it; taken as it is, it would put the pod back on its old
        revision and start a second, needless rollout.  Until an event shows the written
        values (or the pod is replaced), they are laid over what events say."""
        rec = self.pods.get((namespace, name))
        if rec is None:
            return
        rec.annotations.update(annotations)
        uid, pending = self._written.get((namespace, name), (rec.uid, {}))
        if uid != rec.uid:  # written to a pod since replaced: that no longer counts
            pending = {}
        self._written[(namespace, name)] = (rec.uid, {**pending, **annotations})

    def _with_written(self, key: tuple[str, str], uid: str,
                      annotations: dict[str, str]) -> dict[str, str]:
        written = self._written.get(key)
        if written is None:
            return annotations
        wrote_uid, values = written
        if wrote_uid != uid or all(annotations.get(k) == v for k, v in values.items()):
            del self._written[key]  # a new pod, or the echo of our write: events rule again
            return annotations
        return {**annotations, **values}

    def delete_pod(self, namespace: str, name: str) -> set[InstanceKey]:
        self._written.pop((namespace, name), None)
        old = self.pods.pop((namespace, name), None)
        self._count_pod(old, -1)
        return {old.key} if old else set()

    def _count_pod(self, rec: PodRecord | None, delta: int) -> None:
        if rec is None:
            return
        self._with_pods[rec.key] += delta
        if self._with_pods[rec.key] <= 0:
            del self._with_pods[rec.key]

    def pods_of(self, key: InstanceKey) -> list[PodRecord]:
        return sorted((p for p in self.pods.values() if p.key == key), key=lambda p: p.name)

    # ------------------------------------------------------------------ instances

    def instances(self) -> set[InstanceKey]:
        """Instances with pods, and instances that policies name but that have no pods yet
        (their ConfigMap is still written, so a new pod starts with the right table)."""
        return set(self._with_pods) | set(self._named)

    def has_pods(self, key: InstanceKey) -> bool:
        return key in self._with_pods

    def instances_targeted_by(self, rec: PolicyRecord) -> list[InstanceKey]:
        named = rec.instances()
        if named:
            return sorted((rec.namespace, i) for i in named)
        return sorted(k for k in self.instances() if k[0] == rec.namespace)
