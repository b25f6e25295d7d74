"""The operator under measurement: a real API server, the real operator, real Postfix pods.

One :class:`~testbed.kwokcluster.KwokCluster` serves the whole ``python -m bench`` run
(etcd + kube-apiserver built by ``make controlplane``, the project's CRDs, kwok with one
fake node); each scenario works in a fresh namespace.  Postfix "pods" are kwok pods whose
exec kwok maps to started local Postfix instances, so the operator's exec strategy runs
every pod command through kube-apiserver's ``pods/exec`` (the official client's
websocket, as in production).  The operator runs in its own thread and event loop
(Kopf + the official client), logged in with the token of a ServiceAccount of its own:
the server's audit log tells its requests from the benchmark's.

Times: the benchmark watches the namespace's ConfigMaps and pods itself (a raw watch in a
thread) and stamps each event with ``time.perf_counter()`` as it arrives — on loopback a
few milliseconds after the server stored the object.  (The emulation used to stamp the
commit itself, inside the server: figures ending at a "stored" moment now include that
watch delivery.)  Requests are counted from the audit log.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import itertools
import json
import logging
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
import kubernetes.client
import urllib3

from bench.operator_proc import kopf_settings
from mailtls_operator import configmap
from mailtls_operator.controller import Config, Operator, operator_options, register
from mailtls_operator.execrunner import KubernetesExecRunner
from mailtls_operator.kube import Kube
from mailtls_operator.podrunner import ExecResult, PodRef, PodRunner
from mailtls_operator.render import REVISION_KEY
from testbed import InstanceSettings, LocalInstance, stop_all
from testbed.auditlog import WRITES, AuditTail
from testbed.controlplane import Identity
from testbed.kwokcluster import KwokCluster, exec_ready
from testbed.wait import until_async

GROUP, VERSION, PLURAL = "mailtls.io", "v1alpha1", "mailtlspolicies"
# Kopf warns that it cannot install signal handlers outside the main thread: by design here.
logging.getLogger("kopf._core.reactor.running").setLevel(logging.ERROR)
NAMESPACE = "mail"
INSTANCE = "relay"
CM_NAME = f"{INSTANCE}-mailtls"
ANN_REVISION = "mailtls.io/revision"
ANN_APPLIED = "mailtls.io/applied-revision"
OPERATOR_SA = "mailtls-operator"
API_SERVER_NOTE = ("real kube-apiserver + etcd (make controlplane) with kwok pods; pod "
                   "commands through pods/exec")

# ------------------------------------------------------------------------ the cluster

_CLUSTER: KwokCluster | None = None
_WORKDIR: Path | None = None
_NAMES = itertools.count()


def cluster() -> KwokCluster:
    """The run's cluster, started on first use (a few seconds), stopped at exit."""
    global _CLUSTER, _WORKDIR
    if _CLUSTER is None:
        _WORKDIR = Path(tempfile.mkdtemp(prefix="mailtls-bench-cluster-"))
        began = time.perf_counter()
        _CLUSTER = KwokCluster(_WORKDIR).start()
        atexit.register(close_cluster)
        print(f"[bench] kube-apiserver {_CLUSTER.git_version()} at {_CLUSTER.url} + kwok: "
              f"ready in {time.perf_counter() - began:.1f} s", flush=True)
    return _CLUSTER


def close_cluster() -> None:
    """Stop the run's cluster (kwok, kube-apiserver, etcd) and remove its directory."""
    global _CLUSTER, _WORKDIR
    if _CLUSTER is not None:
        _CLUSTER.stop()
        _CLUSTER = None
    if _WORKDIR is not None:
        shutil.rmtree(_WORKDIR, ignore_errors=True)
        _WORKDIR = None


def server_version() -> str:
    return cluster().git_version()


def fresh_namespace(prefix: str = NAMESPACE) -> str:
    """A namespace of its own for one scenario (never reused in a run)."""
    return cluster().namespace(f"{prefix}-{next(_NAMES)}")


# ------------------------------------------------------------------- objects, config


def bench_config(*, probes: bool = False, **settings: Any) -> Config:
    """The operator's Config for a benchmark: production defaults, ``settings`` applied.

    Unless ``probes``, enforce-mode policies are not probed (``probe_enforced=False``):
    after every change the observer would run ``posttls-finger`` for each changed
    destination, a cost of its own that burst_coalescing measures with the defaults.
    """
    names = {f.name for f in dataclasses.fields(Config)}
    if not probes and "probe_enforced" in names:
        settings.setdefault("probe_enforced", False)
    return Config(**{k: v for k, v in settings.items() if k in names})


def policy(name: str, namespace: str = NAMESPACE, **spec: Any) -> dict[str, Any]:
    """A MailTLSPolicy object for ``instance`` relay (the namespace is set on create)."""
    spec.setdefault("instances", [INSTANCE])
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MailTLSPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def create_many(client: kubernetes.client.ApiClient, namespace: str,
                objs: Iterable[dict[str, Any]], workers: int = 16) -> float:
    """Create the policies with ``workers`` in flight; perf_counter() when the last returned."""
    custom = kubernetes.client.CustomObjectsApi(client)

    def one(obj: dict[str, Any]) -> None:
        obj["metadata"]["namespace"] = namespace
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj)

    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(one, objs):
            pass
    return time.perf_counter()


# ------------------------------------------------------------------- watched objects


@dataclass(frozen=True)
class Commit:
    """An object as the bench's watch received it, and when (``time.perf_counter``)."""

    at: float
    resource: str
    namespace: str | None
    name: str
    obj: dict[str, Any]


class Recorder:
    """Watches ConfigMaps and pods of one namespace (raw watches, one thread each): every
    event stamped as it arrives, and the latest object of each name."""

    def __init__(self, client: kubernetes.client.ApiClient, namespace: str,
                 resources: Sequence[str] = ("configmaps", "pods"), *,
                 keep: bool = True) -> None:
        self.client, self.namespace, self.keep = client, namespace, keep
        self.commits: list[Commit] = []
        self.latest: dict[str, dict[str, dict[str, Any]]] = {r: {} for r in resources}
        self._stop = threading.Event()
        self._responses: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(r,), daemon=True,
                                          name=f"bench-watch-{r}") for r in resources]
        self._listed = threading.Barrier(len(resources) + 1)
        self.errors: list[BaseException] = []

    def start(self) -> Recorder:
        for t in self._threads:
            t.start()
        self._listed.wait(30)  # every resource listed: later events are all seen
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for resp in self._responses.values():
                with contextlib.suppress(Exception):
                    resp.shutdown()
        for t in self._threads:
            t.join(10)

    def get(self, resource: str, name: str) -> dict[str, Any] | None:
        return self.latest[resource].get(name)

    def _path(self, resource: str) -> str:
        return f"/api/v1/namespaces/{self.namespace}/{resource}"

    def _call(self, resource: str, query: list[tuple[str, str]]) -> Any:
        """A GET through the client's connection pool (the admin's certificate), the body
        not read yet (urllib3's response)."""
        url = f"{self.client.configuration.host}{self._path(resource)}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        resp = self.client.rest_client.pool_manager.request(
            "GET", url, headers={"Accept": "application/json"}, preload_content=False,
            timeout=urllib3.Timeout(connect=10, read=None))
        if resp.status != 200:
            raise RuntimeError(f"GET {url}: {resp.status} {resp.data[:300]!r}")
        return resp

    def _run(self, resource: str) -> None:
        listed = False
        try:
            while not self._stop.is_set():
                resp = self._call(resource, [])
                body = json.loads(resp.data)
                now = time.perf_counter()
                for obj in body.get("items") or []:
                    self._record(now, resource, obj)
                rv = body["metadata"]["resourceVersion"]
                if not listed:
                    listed = True
                    self._listed.wait(30)
                rv = self._watch(resource, rv)
        except BaseException as exc:  # reported by the harness, not lost in the thread
            if not self._stop.is_set():
                self.errors.append(exc)
            if not listed:
                with contextlib.suppress(threading.BrokenBarrierError):
                    self._listed.abort()

    def _watch(self, resource: str, rv: str) -> str:
        """Watch from ``rv`` until stopped; returns where a relist must start (410)."""
        while not self._stop.is_set():
            resp = self._call(resource, [("watch", "true"), ("resourceVersion", rv),
                                         ("allowWatchBookmarks", "true"),
                                         ("timeoutSeconds", "600")])
            with self._lock:
                self._responses[resource] = resp
            buf = b""
            try:
                for chunk in resp.stream(amt=None, decode_content=False):
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        event = json.loads(line)
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            return rv  # expired: relist
                        rv = obj["metadata"]["resourceVersion"]
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self._record(time.perf_counter(), resource, obj)
                        elif event["type"] == "DELETED":
                            self.latest[resource].pop(obj["metadata"]["name"], None)
            except Exception:
                if self._stop.is_set():
                    return rv
                raise
            finally:
                resp.release_conn()
        return rv

    def _record(self, at: float, resource: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self.latest[resource][meta["name"]] = obj
        if self.keep:
            self.commits.append(Commit(at, resource, meta.get("namespace"), meta["name"], obj))


# --------------------------------------------------------------------- the operator


class OperatorThread:
    """Kopf with the operator's handlers in its own thread and event loop, logged in to
    the cluster as ``identity``, watching ``namespace`` only."""

    def __init__(self, operator: Operator, login: kopf.ConnectionInfo, namespace: str) -> None:
        self.operator, self.namespace = operator, namespace
        self.stop_flag, self.ready_flag = threading.Event(), threading.Event()
        self.errors: list[BaseException] = []
        self.registry = kopf.OperatorRegistry()
        register(self.registry)

        @kopf.on.login(registry=self.registry)
        def _login(**_: Any) -> kopf.ConnectionInfo:
            return login

        self.kopf_settings = kopf_settings()
        self.thread = threading.Thread(target=self._run, name="kopf-operator", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(kopf.operator(
                registry=self.registry, settings=self.kopf_settings, standalone=True,
                clusterwide=False, namespaces=[self.namespace],
                memo=kopf.Memo(operator=self.operator), stop_flag=self.stop_flag,
                ready_flag=self.ready_flag, **operator_options()))
        except BaseException as exc:  # reported by the harness
            self.errors.append(exc)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self.stop_flag.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"the operator did not stop within {timeout} s")
        # Kopf's executor for sync handlers (the login) outlives the operator otherwise.
        self.kopf_settings.execution.executor.shutdown(wait=True)


# ------------------------------------------------------------------------ the scene


@dataclass
class Env:
    """One scenario: its namespace on the cluster, a user's client, the operator."""

    cluster: KwokCluster
    ns: str
    client: kubernetes.client.ApiClient
    operator: Operator
    runner: TimingRunner
    recorder: Recorder
    audit: AuditTail
    identity: Identity
    thread: OperatorThread | None = None

    @property
    def custom(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.client)

    @property
    def commits(self) -> list[Commit]:
        return self.recorder.commits

    # -- what a user does (the sync client, off the event loop) ----------------------

    def create_sync(self, obj: dict[str, Any]) -> float:
        """Create a policy; returns perf_counter() the moment the client call returned."""
        obj["metadata"]["namespace"] = self.ns
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, obj)
        return time.perf_counter()

    def replace_spec_sync(self, namespace: str, name: str, spec: dict[str, Any]) -> float:
        """``kubectl apply`` of a changed spec (JSON patch of /spec); perf_counter() at
        return."""
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name,
            [{"op": "replace", "path": "/spec", "value": spec}],
            _content_type="application/json-patch+json")
        return time.perf_counter()

    # -- what the server has (as last watched) -------------------------------------

    def configmap(self) -> dict[str, Any] | None:
        return self.recorder.get("configmaps", CM_NAME)

    def revision(self) -> str | None:
        cm = self.configmap()
        if cm is None:
            return None
        rev: str | None = (cm["metadata"].get("annotations") or {}).get(ANN_REVISION)
        return rev

    def entries(self) -> int:
        """Policy lines in the stored table (without the revision key), whatever its shape:
        plain, gzip-compressed or split over part ConfigMaps; -1 for a half-written set."""
        return table_entries(self.recorder)

    def requests(self, verbs: str | Iterable[str] | None = None, resource: str | None = None,
                 *, subresource: str | None = "", since: int = 0) -> int:
        """The operator's requests since audit index ``since``, as the server logged them
        (call :meth:`AuditTail.barrier` first for an exact count)."""
        self.audit.poll()
        return self.audit.count(verbs, resource, subresource=subresource,
                                user=self.identity.user, since=since)

    def cm_writes(self) -> int:
        self.audit.barrier()
        return self.requests(WRITES, "configmaps")

    def pods_on(self, revision: str, names: Sequence[str]) -> bool:
        return pods_on(self.recorder, revision, names)

    def idle(self) -> bool:
        """The operator has nothing pending (read from this thread: flags only)."""
        return self.operator.converged

    async def until(self, predicate: Callable[[], Any], timeout: float = 60.0,
                    interval: float = 0.01) -> Any:
        """Poll ``predicate`` while the operator and the bench's watch are alive."""
        return await until_async(predicate, timeout, predicate.__doc__ or repr(predicate),
                                 every=interval, check=self.check)

    def check(self) -> None:
        if self.thread is not None and (self.thread.errors or not self.thread.thread.is_alive()):
            raise RuntimeError(f"the operator died: {self.thread.errors!r}")
        if self.recorder.errors:
            raise RuntimeError(f"the bench's watch failed: {self.recorder.errors!r}")

    async def settle(self, quiet: float = 0.3, timeout: float = 120.0) -> None:
        """Until the operator is idle and made no request for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            await self.until(self.idle, max(0.1, deadline - time.monotonic()))
            before = self.requests()
            await asyncio.sleep(quiet)
            if self.idle() and self.requests() == before:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("the operator did not settle")


def table_entries(recorder: Recorder) -> int:
    """Policy lines of relay's stored table set (-1 while half-written)."""
    bodies = [cm for cm in recorder.latest["configmaps"].values()
              if ((cm.get("metadata") or {}).get("labels") or {}).get(
                  "mailtls.io/instance") == INSTANCE]
    try:
        text = configmap.reassemble(bodies)
    except ValueError:
        return -1
    return sum(1 for ln in text.split("\n")
               if ln and not ln.startswith("#") and not ln.startswith(REVISION_KEY))


def pods_on(recorder: Recorder, revision: str | None, names: Sequence[str]) -> bool:
    """Every named pod carries ``revision`` as its applied revision."""
    if revision is None:
        return False
    for name in names:
        pod = recorder.get("pods", name) or {}
        if ((pod.get("metadata") or {}).get("annotations") or {}).get(ANN_APPLIED) != revision:
            return False
    return True


class NoPods:
    """No pods in this scenario: a pod command would be a bug."""

    async def run(self, *_: Any, **__: Any) -> Any:
        raise AssertionError("unexpected pod command")


@contextlib.asynccontextmanager
async def operating(config: Config, pods: Pods | None = None, *,
                    seed: Callable[[Env], None] | None = None,
                    pod_annotations: dict[str, str] | None = None,
                    start_operator: bool = True) -> AsyncIterator[Env]:
    """A fresh namespace with ``pods`` as kwok pods, ``seed`` applied through the API,
    and the real operator running on it (watching) before the block starts."""
    plane = cluster()
    ns = await asyncio.to_thread(fresh_namespace)
    config = dataclasses.replace(config, namespaces=[ns])  # as `mailtls run -n NS`
    identity = await asyncio.to_thread(plane.identity, ns, OPERATOR_SA)
    user, op_client = plane.api_client(pool=64), plane.api_client(identity, pool=64)
    inner: PodRunner = KubernetesExecRunner(op_client) if pods else NoPods()
    runner = TimingRunner(inner)
    recorder: Recorder | None = None
    try:
        if pods:
            for name, inst in pods.instances.items():
                await asyncio.to_thread(plane.postfix_pod, ns, name, inst,
                                        annotations=pod_annotations)
            await exec_ready(inner, [PodRef(ns, n) for n in pods.names])
            pods.namespace = ns
        audit = plane.audit()
        recorder = await asyncio.to_thread(Recorder(user, ns).start)
        env = Env(plane, ns, user, Operator(Kube(op_client), runner, config), runner,
                  recorder, audit, identity)
        if seed is not None:
            await asyncio.to_thread(seed, env)
        if not start_operator:
            yield env
            return
        env.thread = OperatorThread(env.operator, plane.connection_info(identity), ns)
        mark = await asyncio.to_thread(audit.barrier)
        env.thread.start()
        try:
            def watching() -> bool:
                """the operator watching policies, pods and ConfigMaps"""
                audit.poll()
                found = {r.resource for r in audit.select("watch", None, user=identity.user,
                                                          since=mark)}
                return env.thread is not None and env.thread.ready_flag.is_set() and \
                    found >= {PLURAL, "pods", "configmaps"}

            await env.until(watching, 30, interval=0.05)
            yield env
        finally:
            await asyncio.to_thread(env.thread.stop)
        if env.thread.errors:
            raise RuntimeError("the operator crashed") from env.thread.errors[0]
    finally:
        if recorder is not None:
            await asyncio.to_thread(recorder.stop)
        user.close()
        op_client.close()


# ------------------------------------------------------------------------------- pods


@dataclass(frozen=True)
class Span:
    """One command the operator ran in a pod."""

    start: float
    end: float
    pod: str
    argv: tuple[str, ...]
    returncode: int | None

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def kind(self) -> str:
        """postmap (compile), query (postmap -q), reload, write, swap, other."""
        a = self.argv
        if a and a[0] == "sh" and "mailtls-write" in a:
            return "write"
        if a and a[0] == "postmap":
            return "query" if "-q" in a else "postmap"
        if a and a[0] == "postfix" and "reload" in a:
            return "reload"
        if a and a[0] == "mv":
            return "swap"
        return a[0] if a else "?"

    @property
    def rollout(self) -> bool:
        """A command of the exec rollout itself (stage, compile, swap, reload, verify)."""
        return self.kind in ("write", "postmap", "query", "swap", "reload", "rm")


class TimingRunner:
    """A PodRunner that times every call of the one it wraps."""

    def __init__(self, inner: PodRunner) -> None:
        self.inner = inner
        self.spans: list[Span] = []
        self.in_flight = 0

    async def run(self, pod: PodRef, argv: Sequence[str], *, stdin: bytes | None = None,
                  timeout: float = 60.0) -> ExecResult:
        start = time.perf_counter()
        code: int | None = None
        self.in_flight += 1
        try:
            res = await self.inner.run(pod, argv, stdin=stdin, timeout=timeout)
            code = res.returncode
            return res
        finally:
            self.in_flight -= 1
            self.spans.append(Span(start, time.perf_counter(), pod.name, tuple(argv), code))

    def between(self, start: float, end: float) -> list[Span]:
        return [s for s in list(self.spans) if s.start >= start and s.end <= end]

    def table_compiles(self, pod: str) -> int:
        """Rollouts into ``pod``: one ``postmap`` compile of the staged TLS policy table each."""
        return sum(1 for s in list(self.spans) if s.pod == pod and s.kind == "postmap"
                   and s.argv[-1].endswith("tls_policy.mailtls-new"))


@dataclass
class Pods:
    """Started local Postfix instances standing in for the pods of instance relay."""

    base: Path
    instances: dict[str, LocalInstance] = field(default_factory=dict)
    namespace: str = ""
    """Where :func:`operating` made them pods."""

    @property
    def names(self) -> list[str]:
        return sorted(self.instances)


@contextlib.contextmanager
def local_pods(count: int, prefix: str = "relay",
               **settings: Any) -> Iterator[Pods]:
    """``count`` started local Postfix instances; every one stopped (and its directory
    removed) on the way out, whatever happened."""
    base = Path(tempfile.mkdtemp(prefix="mailtls-bench-pods-"))
    base.chmod(0o755)  # Postfix daemons (user postfix) must reach into it
    pods = Pods(base)
    started: list[LocalInstance] = []
    try:
        for n in range(count):
            name = f"{prefix}-{n}"
            inst = LocalInstance(base / name, InstanceSettings(name=name, **settings))
            inst.create()
            started.append(inst)
            inst.start()
            pods.instances[name] = inst
        yield pods
    finally:
        errors = stop_all(started)
        shutil.rmtree(base, ignore_errors=True)
        if any(i.running for i in started):
            raise RuntimeError("a Postfix master survived the benchmark")
        if errors:
            raise RuntimeError(f"stopping Postfix: {errors}")


async def gather_limited(coros: Sequence[Any], limit: int) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(coro: Any) -> Any:
        async with sem:
            return await coro

    return list(await asyncio.gather(*(one(c) for c in coros)))
