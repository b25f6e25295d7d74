"""One pod brought to a revision: stage, swap, reload, verify (each step's failure stops
the pod with Postfix's own message)."""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from .. import postfix
from ..configmap import COMPRESS_ABOVE
from ..podrunner import ExecResult, PodRunner, PodRunnerError, StdinUnsupportedError
from ..render import REVISION_KEY
from .model import DEFAULT_SAMPLE, DEFAULT_TIMEOUT, PodOutcome, PodStatus, PodTarget, Step, TableSet


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


class PodApply:
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
                return parse_query_output(res.stdout)
        found: dict[str, str] = {}
        for key in keys:
            res = await self._exec(Step.VERIFY,
                                   postfix.postmap_query(key, self.map_type, table.live))
            if res.ok:
                found[key] = res.stdout.decode("utf-8", "replace").rstrip("\n")
            elif res.stderr.strip():
                raise _Stop(Step.VERIFY, res.message())
        return found


def parse_query_output(stdout: bytes) -> dict[str, str]:
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
    return await PodApply(runner, target, tables, timeout, sample).run()


PodDone = Callable[[PodTarget], Awaitable[None]]
