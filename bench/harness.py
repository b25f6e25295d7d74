"""The operator under measurement: the API emulation of the integration tests, the real
operator (Kopf + official client) in its own thread, and real local Postfix "pods".

Everything is on loopback.  The emulator (``testbed/apiserver.py``) runs in
the benchmark's event loop; the operator in its own thread and loop, exactly as in
``tests/integration``.  :class:`BenchServer` adds one thing: the time at which each
object was stored, taken in the server as it commits, so a latency ends at the moment
the API server had the new object, not when a poller noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import attrs
import kmock
import kopf
import kubernetes.client

from mailtls_operator import configmap
from mailtls_operator.controller import Config, Operator, build_registry
from mailtls_operator.kube import Kube
from mailtls_operator.podrunner import ExecResult, PodRef, PodRunner
from mailtls_operator.render import REVISION_KEY
from testbed import InstanceSettings, LocalInstance, LocalPodRunner, stop_all
from testbed.apiserver import ApiServer, RunningOperator, run_operator

GROUP, VERSION, PLURAL = "mailtls.io", "v1alpha1", "mailtlspolicies"
# Kopf warns that it cannot install signal handlers outside the main thread: by design here.
logging.getLogger("kopf._core.reactor.running").setLevel(logging.ERROR)
NAMESPACE = "mail"
INSTANCE = "relay"
CM_NAME = f"{INSTANCE}-mailtls"
ANN_REVISION = "mailtls.io/revision"
ANN_APPLIED = "mailtls.io/applied-revision"


@dataclass(frozen=True)
class Commit:
    """An object as the server stored it, and when (``time.perf_counter``)."""

    at: float
    resource: str
    namespace: str | None
    name: str
    obj: dict[str, Any]


@attrs.define(kw_only=True)
class BenchServer(ApiServer):
    """The test API server, recording the commit time of the resources named in ``track``."""

    track: frozenset[str] = frozenset({"configmaps", "pods"})
    commits: list[Commit] = attrs.field(factory=list, init=False)

    def _commit(self, spec: Any, key: Any, new: Any, old: Any, kind: str) -> None:
        super()._commit(spec, key, new, old, kind)
        if spec.plural in self.track:
            self.commits.append(Commit(time.perf_counter(), spec.plural, key[1], key[2], new))


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
    """A MailTLSPolicy object for ``instance`` relay."""
    spec.setdefault("instances", [INSTANCE])
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MailTLSPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def pod_object(name: str, inst: LocalInstance, namespace: str = NAMESPACE) -> dict[str, Any]:
    """A Running, Ready Postfix pod of the instance whose tables live in ``inst``."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"mailtls.io/instance": INSTANCE, "app": "postfix"},
                     "annotations": {"mailtls.io/map-path": str(inst.map_path),
                                     "mailtls.io/map-type": inst.settings.map_type}},
        "spec": {"containers": [{"name": "postfix", "image": "postfix"}]},
        "status": {"phase": "Running",
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


@dataclass
class Env:
    """One running emulation: server, a user's client, the operator."""

    server: BenchServer
    client: kubernetes.client.ApiClient
    operator: Operator
    running: RunningOperator | None = None

    @property
    def custom(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.client)

    # -- what a user does (the sync client, off the server's loop) -----------------

    def create_sync(self, obj: dict[str, Any]) -> float:
        """Create a policy; returns perf_counter() the moment the client call returned."""
        self.custom.create_namespaced_custom_object(GROUP, VERSION,
                                                    obj["metadata"]["namespace"], PLURAL, obj)
        return time.perf_counter()

    def replace_spec_sync(self, namespace: str, name: str, spec: dict[str, Any]) -> float:
        """``kubectl apply`` of a changed spec (JSON patch of /spec); perf_counter() at return."""
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name,
            [{"op": "replace", "path": "/spec", "value": spec}],
            _content_type="application/json-patch+json")
        return time.perf_counter()

    # -- what the server has ---------------------------------------------------------

    def configmap(self) -> dict[str, Any] | None:
        return self.server.get_object("v1/configmaps", NAMESPACE, CM_NAME)

    def revision(self) -> str | None:
        cm = self.configmap()
        if cm is None:
            return None
        rev: str | None = (cm["metadata"].get("annotations") or {}).get(ANN_REVISION)
        return rev

    def entries(self) -> int:
        """Policy lines in the stored table (without the revision key), whatever its shape:
        plain, gzip-compressed or split over part ConfigMaps; -1 for a half-written set."""
        bodies = [cm for cm in self.server.list_objects("v1/configmaps", NAMESPACE)
                  if ((cm.get("metadata") or {}).get("labels") or {}).get(
                      "mailtls.io/instance") == INSTANCE]
        try:
            text = configmap.reassemble(bodies)
        except ValueError:
            return -1
        return sum(1 for ln in text.splitlines()
                   if ln and not ln.startswith("#") and not ln.startswith(REVISION_KEY))

    def cm_writes(self) -> int:
        return self.server.request_count(("create", "patch", "update"), "configmaps")

    def pods_on(self, revision: str, names: Sequence[str]) -> bool:
        for name in names:
            pod = self.server.get_object("v1/pods", NAMESPACE, name) or {}
            if (pod.get("metadata", {}).get("annotations") or {}).get(ANN_APPLIED) != revision:
                return False
        return True

    def idle(self) -> bool:
        """The operator has nothing pending (read from this thread: flags only)."""
        return self.operator.converged

    async def until(self, predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
        return await self.server.wait_until(predicate, timeout)

    async def settle(self, quiet: float = 0.3, timeout: float = 120.0) -> None:
        """Until the operator is idle and no request arrived for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            await self.until(self.idle, max(0.1, deadline - time.monotonic()))
            before = len(self.server.request_log)
            await asyncio.sleep(quiet)
            if self.idle() and len(self.server.request_log) == before:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("the operator did not settle")


def client_for(server: ApiServer) -> kubernetes.client.ApiClient:
    configuration = kubernetes.client.Configuration()
    configuration.host = str(server.url).rstrip("/")
    configuration.connection_pool_maxsize = 64
    return kubernetes.client.ApiClient(configuration)


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[BenchServer]:
    """Only the API server (for a benchmark that runs the operator elsewhere)."""
    async with BenchServer() as server, kmock.Server(server):
        try:
            yield server
        finally:
            await server.close_streams()
    if server.server_errors:
        raise RuntimeError(f"the API emulation failed internally: {server.server_errors!r}")


@contextlib.asynccontextmanager
async def emulation(config: Config, runner: PodRunner,
                    seed: Callable[[BenchServer], None] | None = None,
                    start_operator: bool = True) -> AsyncIterator[Env]:
    """The API server on loopback, ``seed`` applied, and the real operator running on it."""
    async with serving() as server:
        if seed is not None:
            seed(server)
        with client_for(server) as user, client_for(server) as op_client:
            op = Operator(Kube(op_client), runner, config)
            env = Env(server, user, op)
            if not start_operator:
                yield env
                return
            try:
                async with run_operator(server, build_registry(),
                                        memo=kopf.Memo(operator=op)) as running:
                    env.running = running
                    yield env
            finally:
                if env.running is not None:  # Kopf's executor for sync handlers (the login)
                    env.running.settings.execution.executor.shutdown(wait=True)


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
    runner: LocalPodRunner
    instances: dict[str, LocalInstance] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return sorted(self.instances)

    def seed(self, server: ApiServer) -> None:
        for name, inst in self.instances.items():
            server.seed("v1/pods", pod_object(name, inst))


@contextlib.contextmanager
def local_pods(count: int, prefix: str = "relay",
               **settings: Any) -> Iterator[Pods]:
    """``count`` started local Postfix instances; every one stopped (and its directory
    removed) on the way out, whatever happened."""
    base = Path(tempfile.mkdtemp(prefix="mailtls-bench-pods-"))
    base.chmod(0o755)  # Postfix daemons (user postfix) must reach into it
    pods = Pods(base, LocalPodRunner())
    started: list[LocalInstance] = []
    try:
        for n in range(count):
            name = f"{prefix}-{n}"
            inst = LocalInstance(base / name, InstanceSettings(name=name, **settings))
            inst.create()
            started.append(inst)
            inst.start()
            pods.instances[name] = inst
            pods.runner.add(PodRef(NAMESPACE, name), inst)
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
