"""The ``exec`` rollout strategy: rendered tables into running Postfix pods, verified.

Independent of Kubernetes: everything happens through a
:class:`~.podrunner.PodRunner` with argv from :mod:`.postfix`; the controller
calls :func:`roll_out` and turns the outcome into annotations, status and
events.  Per pod (:func:`apply_to_pod`, DESIGN.md §7):

1. **stage** each table next to the live one (``<path>.mailtls-new``): the
   text on stdin, its byte count checked (a transport that cut stdin short
   must not compile half a table), then ``postmap`` it.  Both tables are
   staged before either goes live, so a failure in the second leaves the
   pod entirely on the old revision.
2. **swap**: ``mv`` the compiled database over the live one, then the text
   (rename(2) in one directory: Postfix sees the old or the new table,
   never a partial one).  The TLS policy goes first: a new ``route: direct``
   transport entry must never be live before the policy that protects it.
3. ``postfix reload`` only for ``texthash`` (read once per process), when the
   transport table changed (trivial-rewrite keeps routing with the old one on
   its long-lived connections: measured), or when the pod asks for it
   (``mailtls.io/reload: "true"``).  A TLS-policy-only change of an indexed
   table (lmdb, cdb, hash, btree) needs none: the smtp client notices the
   renamed file before its next connection ("table ... has changed --
   restarting"), while a reload stalls deliveries (DESIGN.md §7; ``make
   bench`` measures it).
4. **verify** with ``postmap -q`` that the live table returns exactly the
   rendered values for the revision key (``mailtls-revision.invalid``) and a
   deterministic sample of keys.

A step that fails stops the pod with the step's name and Postfix's own
message; a table whose ``postmap`` failed is never swapped and the staged
files are removed.  :func:`roll_out` takes pods in a stable order, at most
``parallelism`` at a time, and stops at the first pod that does not verify,
leaving the rest on the old table.

Exec transports that cannot close stdin (``v4.channel.k8s.io``) raise
:class:`~.podrunner.StdinUnsupportedError`; the table is then staged with
``cp`` from the ConfigMap mounted in the pod once its sha256 shows the kubelet
has synced the new revision (until then the pod outcome is ``waiting``, which
is retryable and not an error).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import posixpath
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

from . import postfix
from .configmap import COMPRESS_ABOVE
from .podrunner import ExecResult, PodRef, PodRunner, PodRunnerError, StdinUnsupportedError
from .render import REVISION_KEY

DEFAULT_MAP_PATH = "/var/lib/mailtls/tls_policy"
DEFAULT_MAP_TYPE = "lmdb"
DEFAULT_CONFIGMAP_DIR = "/etc/mailtls"
DEFAULT_SAMPLE = 5
DEFAULT_TIMEOUT = 60.0


class Step(StrEnum):
    """Where a pod's rollout stopped; also the keys of :attr:`PodOutcome.timings`."""

    WRITE = "write"
    POSTMAP = "postmap"
    SWAP = "swap"
    RELOAD = "reload"
    VERIFY = "verify"
    ANNOTATE = "annotate"


class PodStatus(StrEnum):
    APPLIED = "applied"
    """The revision was installed and verified now."""
    UNCHANGED = "unchanged"
    """The pod already had the revision: no command was run."""
    WAITING = "waiting"
    """Not an error: the mounted ConfigMap does not show the revision yet; retry soon."""
    FAILED = "failed"


INDEXED_TYPES = frozenset({"lmdb", "cdb", "hash", "btree"})
"""Table types whose file Postfix re-opens by itself when it is replaced."""


@dataclass(frozen=True)
class PodTarget:
    """A pod to bring to a revision, and where its tables live in it.

    ``transport_path`` defaults to ``transport`` beside ``map_path``.
    ``applied_revision`` is the pod's ``mailtls.io/applied-revision``
    annotation: equal to the wanted revision, the pod is left alone.
    """

    pod: PodRef
    map_path: str = DEFAULT_MAP_PATH
    map_type: str = DEFAULT_MAP_TYPE
    applied_revision: str | None = None
    transport_path: str | None = None
    configmap_dir: str = DEFAULT_CONFIGMAP_DIR
    reload: bool = False
    """Run ``postfix reload`` after the swap even for an indexed table type."""

    @property
    def needs_reload(self) -> bool:
        return self.reload or self.map_type not in INDEXED_TYPES

    def __post_init__(self) -> None:
        postfix.check_map_type(self.map_type)
        postfix.check_map_path(self.map_path)
        postfix.check_map_path(self.configmap_dir)
        if self.transport_map_path == self.map_path:
            raise postfix.InvalidArgument(
                f"transport table and TLS policy table are the same file: {self.map_path}")

    @property
    def transport_map_path(self) -> str:
        path = self.transport_path or posixpath.join(posixpath.dirname(self.map_path),
                                                     "transport")
        return postfix.check_map_path(path)


class Rendered(Protocol):
    """What :func:`TableSet.of` needs from a render result (``render.Tables``)."""

    @property
    def revision(self) -> str: ...
    @property
    def tls_policy(self) -> str: ...
    @property
    def transport(self) -> str | None: ...
    @property
    def tls_entries(self) -> Mapping[str, str]: ...
    @property
    def transport_entries(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class TableSet:
    """The tables of one revision, as rendered, plus the entries to verify against.

    ``tls_entries`` maps every key to its exact rendered value and includes
    the revision key.  ``transport`` None or empty means "no routes": an
    empty transport table is still installed, so routes that were removed
    leave the pod too.
    """

    revision: str
    tls_policy: str
    transport: str | None
    tls_entries: Mapping[str, str]
    transport_entries: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.revision:
            raise ValueError("a TableSet needs a revision")
        if REVISION_KEY not in self.tls_entries:
            raise ValueError(f"tls_entries lacks the revision key {REVISION_KEY}")

    @classmethod
    def of(cls, rendered: Rendered) -> TableSet:
        """Adopt a render result (``mailtls_operator.render.Tables``)."""
        return cls(rendered.revision, rendered.tls_policy, rendered.transport,
                   dict(rendered.tls_entries), dict(rendered.transport_entries))

    @property
    def revision_value(self) -> str:
        return self.tls_entries[REVISION_KEY]


@dataclass(frozen=True)
class PodOutcome:
    """What happened in one pod.  ``message`` is Postfix's own words on failure."""

    pod: PodRef
    revision: str
    status: PodStatus
    step: Step | None = None
    message: str = ""
    notes: tuple[str, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)
    """Seconds per step (``write``, ``postmap``, ``swap``, ``reload``, ``verify``)."""

    @property
    def ok(self) -> bool:
        return self.status in (PodStatus.APPLIED, PodStatus.UNCHANGED)

    @property
    def retryable(self) -> bool:
        """Every stop is retried with backoff; ``waiting`` is expected to clear soon."""
        return not self.ok

    @property
    def duration(self) -> float:
        return sum(self.timings.values())

    def describe(self) -> str:
        """One line for status messages and events."""
        if self.ok:
            return f"{self.pod}: {self.status.value}"
        return f"{self.pod}: {self.status.value} at {self.step}: {self.message}"


@dataclass(frozen=True)
class RolloutOutcome:
    """The result of :func:`roll_out` for one instance."""

    revision: str
    total: int
    outcomes: tuple[PodOutcome, ...]
    """One per attempted pod, in rollout order."""
    untouched: tuple[PodRef, ...]
    """Pods not attempted because the rollout stopped: still on their old table."""

    @property
    def updated(self) -> int:
        """Pods on the revision now (applied or already there)."""
        return sum(1 for o in self.outcomes if o.ok)

    @property
    def failures(self) -> tuple[PodOutcome, ...]:
        return tuple(o for o in self.outcomes if not o.ok)

    @property
    def failure(self) -> PodOutcome | None:
        """The (first) pod that stopped the rollout, if any."""
        return next(iter(self.failures), None)

    @property
    def ok(self) -> bool:
        return self.updated == self.total

    def message(self) -> str:
        """``2/3 pods at revision 9f2c…; mail/relay-1: failed at postmap: …``."""
        head = f"{self.updated}/{self.total} pods at revision {self.revision[:16]}"
        failure = self.failure
        return head if failure is None else f"{head}; {failure.describe()}"

    def failure_message(self) -> str | None:
        """None when every pod is on the revision, else :meth:`message` (for status)."""
        return None if self.failure is None else self.message()


class _Stop(Exception):
    """Internal: a step ended the pod's rollout."""

    def __init__(self, step: Step, message: str, status: PodStatus = PodStatus.FAILED) -> None:
        super().__init__(message)
        self.step = step
        self.message = message
        self.status = status


@dataclass
class _Table:
    name: str  # tls_policy | transport
    live: str
    text: str
    entries: Mapping[str, str]

    @property
    def staged(self) -> str:
        return self.live + postfix.NEW_SUFFIX


class _PodApply:
    """One pod's apply; state (stdin support, timings, notes) lives for one call."""

    def __init__(self, runner: PodRunner, target: PodTarget, tables: TableSet,
                 timeout: float, sample: int) -> None:
        self.runner = runner
        self.target = target
        self.tables = tables
        self.timeout = timeout
        self.sample = sample
        self.stdin_ok = True
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self.tls = _Table("tls_policy", target.map_path, tables.tls_policy, tables.tls_entries)
        self.transport = _Table("transport", target.transport_map_path,
                                tables.transport or "", tables.transport_entries)

    @property
    def map_type(self) -> str:
        return self.target.map_type

    async def run(self) -> PodOutcome:
        try:
            try:
                for table in (self.tls, self.transport):
                    await self._stage(table)
            except _Stop:
                for table in (self.tls, self.transport):
                    await self._discard(table)
                raise
            reload = self.target.needs_reload or await self._changed(self.transport)
            with self._timed(Step.SWAP):
                for table in (self.tls, self.transport):
                    await self._swap(table)
            if reload:
                with self._timed(Step.RELOAD):
                    res = await self._exec(Step.RELOAD, postfix.postfix_reload())
                    if not res.ok:
                        raise _Stop(Step.RELOAD, res.message())
            with self._timed(Step.VERIFY):
                await self._verify(self.tls, required=(REVISION_KEY,))
                await self._verify(self.transport, required=())
        except _Stop as stop:
            return self._outcome(stop.status, stop.step, stop.message)
        return self._outcome(PodStatus.APPLIED)

    def _outcome(self, status: PodStatus, step: Step | None = None,
                 message: str = "") -> PodOutcome:
        return PodOutcome(self.target.pod, self.tables.revision, status, step, message,
                          tuple(dict.fromkeys(self.notes)),
                          {k: v for k, v in self.timings.items() if v})

    @contextlib.contextmanager
    def _timed(self, step: Step) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - t0
            self.timings[step.value] = self.timings.get(step.value, 0.0) + spent

    async def _exec(self, step: Step, argv: Sequence[str], stdin: bytes | None = None,
                    ) -> ExecResult:
        """Run one command; a runner failure ends the pod at ``step``."""
        try:
            res = await self.runner.run(self.target.pod, argv, stdin=stdin,
                                        timeout=self.timeout)
        except StdinUnsupportedError:
            raise
        except PodRunnerError as exc:
            raise _Stop(step, str(exc)) from exc
        self.notes.extend(res.notes)
        return res

    # -- stage ---------------------------------------------------------------

    async def _stage(self, table: _Table) -> None:
        with self._timed(Step.WRITE):
            await self._write(table)
        with self._timed(Step.POSTMAP):
            await self._compile(table)

    async def _write(self, table: _Table) -> None:
        data = table.text.encode("utf-8")
        if self.stdin_ok:
            try:
                res = await self._exec(Step.WRITE, postfix.write_file(table.staged), stdin=data)
            except StdinUnsupportedError:
                self.stdin_ok = False
                self.notes.append("the exec transport cannot close stdin (no "
                                  "v5.channel.k8s.io): tables staged from the mounted "
                                  "ConfigMap")
            else:
                if not res.ok:
                    raise _Stop(Step.WRITE, res.message())
                written = res.stdout.decode("ascii", "replace").strip()
                if written != str(len(data)):
                    raise _Stop(Step.WRITE, f"{table.staged}: wrote {written or '?'} bytes of "
                                f"{len(data)}: stdin was cut short")
                return
        await self._copy_from_configmap(table, data)

    async def _copy_from_configmap(self, table: _Table, data: bytes) -> None:
        """Stage without stdin: ``cp`` the mounted ConfigMap file, prove it is this revision."""
        if len(data) > COMPRESS_ABOVE:
            raise _Stop(Step.WRITE,
                        f"the API server cannot close exec stdin (websocket v4) and the "
                        f"{table.name} table ({len(data)} bytes) is stored gzip-compressed in "
                        "the ConfigMap, which this fallback cannot copy: use Kubernetes 1.30+ "
                        "(exec v5) or the restart strategy")
        src = posixpath.join(self.target.configmap_dir, table.name) if data else "/dev/null"
        res = await self._exec(Step.WRITE, postfix.copy_file(src, table.staged))
        if not res.ok:
            if data and "No such file" in res.message():
                raise _Stop(Step.WRITE, self._not_synced(src, "missing"), PodStatus.WAITING)
            raise _Stop(Step.WRITE, res.message())
        res = await self._exec(Step.WRITE, postfix.sha256_file(table.staged))
        if not res.ok:
            raise _Stop(Step.WRITE, res.message())
        got = res.stdout.decode("ascii", "replace").split(" ", 1)[0]
        if got != hashlib.sha256(data).hexdigest():
            raise _Stop(Step.WRITE, self._not_synced(src, f"sha256 {got[:12]}"),
                        PodStatus.WAITING)

    def _not_synced(self, src: str, seen: str) -> str:
        return (f"{src} in the pod ({seen}) is not revision {self.tables.revision[:16]} yet: "
                "waiting for the kubelet to sync the ConfigMap")

    async def _compile(self, table: _Table) -> None:
        if postfix.compiles(self.map_type):
            argv = postfix.postmap_compile(self.map_type, table.staged)
        else:  # texthash: no database; parse it once the way Postfix will
            argv = postfix.postmap_query(REVISION_KEY, self.map_type, table.staged)
        res = await self._exec(Step.POSTMAP, argv)
        if res.ok:
            return
        if not postfix.compiles(self.map_type) and not res.stderr.strip():
            return  # texthash parsed; a miss (exit 1, silent) is fine for the transport table
        raise _Stop(Step.POSTMAP, res.message())

    async def _changed(self, table: _Table) -> bool:
        """Does the live ``table`` differ from the one about to replace it?  Measured on
        real Postfix: the smtp client re-opens a replaced TLS policy table by itself, but
        trivial-rewrite, on its long-lived connections, keeps routing with the old
        ``transport_maps`` -- so a changed transport table still needs a reload."""
        with self._timed(Step.SWAP):
            res = await self._exec(Step.SWAP, postfix.sha256_file(table.live))
        wanted = hashlib.sha256(table.text.encode("utf-8")).hexdigest()
        return not res.ok or res.stdout.decode("ascii", "replace").split(" ", 1)[0] != wanted

    async def _discard(self, table: _Table) -> None:
        """Best effort: remove a staged table that must never go live (before any swap)."""
        paths = [table.staged]
        if postfix.compiles(self.map_type):
            paths.append(postfix.db_path(self.map_type, table.staged))
        with contextlib.suppress(PodRunnerError):
            await self.runner.run(self.target.pod, postfix.remove(paths), timeout=self.timeout)

    # -- swap, verify ----------------------------------------------------------

    async def _swap(self, table: _Table) -> None:
        moves = []
        if postfix.compiles(self.map_type):
            moves.append((postfix.db_path(self.map_type, table.staged),
                          postfix.db_path(self.map_type, table.live)))
        moves.append((table.staged, table.live))
        for src, dst in moves:
            res = await self._exec(Step.SWAP, postfix.move(src, dst))
            if not res.ok:
                raise _Stop(Step.SWAP, res.message())

    async def _verify(self, table: _Table, required: tuple[str, ...]) -> None:
        keys = list(required) + sample_keys(table.entries, self.sample, exclude=required)
        if not keys:
            return
        got = await self._lookup(table, keys)
        for key in keys:
            want = table.entries[key]
            have = got.get(key)
            if have != want:
                shown = "no entry" if have is None else repr(have)
                raise _Stop(Step.VERIFY,
                            f"{postfix.map_spec(self.map_type, table.live)}: {key} -> {shown}, "
                            f"expected {want!r}")

    async def _lookup(self, table: _Table, keys: list[str]) -> dict[str, str]:
        """Look ``keys`` up in the live table: one ``postmap -q -`` (or one call per key)."""
        if self.stdin_ok:
            argv = postfix.postmap_query_stdin(self.map_type, table.live)
            data = "".join(k + "\n" for k in keys).encode("utf-8")
            try:
                res = await self._exec(Step.VERIFY, argv, stdin=data)
            except StdinUnsupportedError:
                self.stdin_ok = False
            else:
                if not res.ok and res.stderr.strip():
                    raise _Stop(Step.VERIFY, res.message())
                return _parse_query_output(res.stdout)
        found: dict[str, str] = {}
        for key in keys:
            res = await self._exec(Step.VERIFY,
                                   postfix.postmap_query(key, self.map_type, table.live))
            if res.ok:
                found[key] = res.stdout.decode("utf-8", "replace").rstrip("\n")
            elif res.stderr.strip():
                raise _Stop(Step.VERIFY, res.message())
        return found


def _parse_query_output(stdout: bytes) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in stdout.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("\t")
        if sep:
            found.setdefault(key, value)
    return found


def sample_keys(entries: Mapping[str, str], size: int,
                exclude: Iterable[str] = ()) -> list[str]:
    """Up to ``size`` keys spread evenly over the sorted keys, first and last included.

    Deterministic, so the same revision is always verified the same way.
    """
    skip = set(exclude)
    keys = sorted(k for k in entries if k not in skip)
    if size <= 0 or not keys:
        return []
    if len(keys) <= size:
        return keys
    if size == 1:
        return [keys[0]]
    step = (len(keys) - 1) / (size - 1)
    return [keys[round(i * step)] for i in range(size)]


async def apply_to_pod(runner: PodRunner, target: PodTarget, tables: TableSet, *,
                       timeout: float = DEFAULT_TIMEOUT,
                       sample: int = DEFAULT_SAMPLE) -> PodOutcome:
    """Bring one pod to ``tables.revision``; see the module docstring.

    ``timeout`` bounds each command.  Returns without running anything when
    the pod's applied revision already is the wanted one.
    """
    if target.applied_revision == tables.revision:
        return PodOutcome(target.pod, tables.revision, PodStatus.UNCHANGED)
    return await _PodApply(runner, target, tables, timeout, sample).run()


PodDone = Callable[[PodTarget], Awaitable[None]]


async def roll_out(runner: PodRunner, targets: Iterable[PodTarget], tables: TableSet, *,
                   parallelism: int = 1, timeout: float = DEFAULT_TIMEOUT,
                   sample: int = DEFAULT_SAMPLE,
                   on_pod_done: PodDone | None = None) -> RolloutOutcome:
    """Apply ``tables`` to every target, ``parallelism`` pods at a time, in pod order.

    Stops starting pods at the first one that does not end ``applied`` or
    ``unchanged``; pods already in flight finish.  ``on_pod_done(target)`` is
    awaited after each pod that was applied and verified (the controller
    annotates the pod there); if it raises, that pod counts as failed at
    ``annotate`` (its table is live, and re-applying it later is a no-op for mail).
    """
    if parallelism < 1:
        raise ValueError("parallelism must be at least 1")
    order = sorted(targets, key=lambda t: t.pod)
    if len({t.pod for t in order}) != len(order):
        raise ValueError("a pod is listed twice")
    results: dict[PodRef, PodOutcome] = {}
    pending = iter(order)
    stopped = False

    async def worker() -> None:
        nonlocal stopped
        for target in pending:
            if stopped:
                return
            outcome = await apply_to_pod(runner, target, tables, timeout=timeout,
                                         sample=sample)
            if outcome.status is PodStatus.APPLIED and on_pod_done is not None:
                try:
                    await on_pod_done(target)
                except Exception as exc:  # the controller's failure, reported, not raised
                    outcome = replace(outcome, status=PodStatus.FAILED, step=Step.ANNOTATE,
                                      message=f"{type(exc).__name__}: {exc}")
            results[target.pod] = outcome
            if not outcome.ok:
                stopped = True

    await asyncio.gather(*(worker() for _ in range(min(parallelism, len(order)) or 1)))
    outcomes = tuple(results[t.pod] for t in order if t.pod in results)
    untouched = tuple(t.pod for t in order if t.pod not in results)
    return RolloutOutcome(tables.revision, len(order), outcomes, untouched)


# -- the instance's routing (DESIGN.md §5) ----------------------------------------


@dataclass(frozen=True)
class InstanceConfig:
    """The routing-relevant main.cf values of a running instance (``postconf -x``)."""

    relayhost: str = ""
    transport_maps: str = ""
    smtp_tls_policy_maps: str = ""
    smtp_dns_support_level: str = ""
    default_transport: str = "smtp"

    @property
    def relay_nexthops(self) -> tuple[str, ...]:
        """Next-hops every non-routed message goes to: ``relayhost`` (a list since
        Postfix 3.5), or the next-hop of ``default_transport = smtp:[host]``."""
        hops = _split_list(self.relayhost)
        if not hops:
            _, sep, nexthop = self.default_transport.partition(":")
            if sep and nexthop.strip():
                hops = _split_list(nexthop)
        return tuple(h.lower() for h in hops)

    @property
    def transport_tables(self) -> tuple[str, ...]:
        return _split_list(self.transport_maps)


def _split_list(value: str) -> tuple[str, ...]:
    return tuple(p for p in re.split(r"[\s,]+", value.strip()) if p)


class PostfixCommandError(Exception):
    """A read-only Postfix command in a pod failed; the message is Postfix's."""


async def read_instance_config(runner: PodRunner, pod: PodRef, *,
                               timeout: float = 30.0) -> InstanceConfig:
    """Read a pod's effective routing settings with ``postconf -x``."""
    params = (*postfix.INSTANCE_PARAMS, "default_transport")
    res = await runner.run(pod, postfix.postconf_get(params), timeout=timeout)
    if not res.ok:
        raise PostfixCommandError(f"{pod}: postconf: {res.message()}")
    values = postfix.parse_postconf(res.stdout.decode("utf-8", "replace"))
    return InstanceConfig(
        relayhost=values.get("relayhost", ""),
        transport_maps=values.get("transport_maps", ""),
        smtp_tls_policy_maps=values.get("smtp_tls_policy_maps", ""),
        smtp_dns_support_level=values.get("smtp_dns_support_level", ""),
        default_transport=values.get("default_transport", "smtp"),
    )


def table_problems(config: InstanceConfig, target: PodTarget) -> list[str]:
    """Why the tables written to ``target`` would not be used by this instance, if so.

    A rollout into a pod whose main.cf does not name the managed table
    "succeeds" and changes nothing; say so instead.  ``proxy:`` is looked
    through (``proxy:lmdb:/path`` uses ``/path``).  The transport table only
    matters when there are routes, so it is checked by ``bypassed_keys``.
    """
    wanted = postfix.map_spec(target.map_type, target.map_path)
    used = [t.removeprefix("proxy:") for t in _split_list(config.smtp_tls_policy_maps)]
    if wanted in used:
        return []
    return [f"smtp_tls_policy_maps is {config.smtp_tls_policy_maps or '(empty)'!r}, "
            f"not {wanted}: the instance never reads the table the operator writes"]


def bypassed_keys(keys: Iterable[str], config: InstanceConfig,
                  routed_keys: Iterable[str] = (), *,
                  transport_table: str | None = None) -> list[str]:
    """Policy keys this instance can never look up (the relayhost trap).

    The TLS policy table is looked up with the next-hop verbatim.  With a
    relay next-hop (``relayhost``, or ``default_transport`` with a next-hop),
    every message not routed by ``transport_maps`` has that next-hop, so a key
    is used only if it *is* a relay next-hop verbatim (``[host]:port`` as
    written in main.cf) or it is in ``routed_keys`` (keys whose next-hop a
    transport entry makes equal to the key: ``route: direct``).  Routed keys
    count only if the instance has ``transport_maps`` at all, and, when
    ``transport_table`` (``TYPE:PATH``) is given, only if that table is in it.
    Without a relay next-hop nothing is bypassed here.  Sorted, without duplicates.
    """
    relays = set(config.relay_nexthops)
    if not relays:
        return []
    tables = [t.removeprefix("proxy:") for t in config.transport_tables]
    routing = bool(tables) and (transport_table is None or transport_table in tables)
    routed = set(routed_keys) if routing else set()
    return sorted({k for k in keys
                   if k != REVISION_KEY and k.lower() not in relays and k not in routed})
