"""``LocalPodRunner``: the :class:`~mailtls_operator.podrunner.PodRunner` for local instances.

A "pod" is a :class:`~.instance.LocalInstance`; ``run`` executes the very argv
the operator would send through the Kubernetes exec API, as a subprocess with
no shell, ``MAIL_CONFIG`` pointing at the instance, stdin written then closed.
Failures are the real ones: a pod that is not registered (deleted) or whose
Postfix is not running raises :class:`PodRunnerError` the way an exec into a
missing or crashed container does; a command that outlives ``timeout`` is
killed (its whole process group) and reported the same way.  With
``stdin_supported=False`` the runner behaves like an API server that only
speaks ``v4.channel.k8s.io``: any command given stdin raises
:class:`StdinUnsupportedError` before it starts.

Every call is recorded in :attr:`LocalPodRunner.calls`, so a test can prove
that a no-op rollout ran no command at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mailtls_operator.podrunner import ExecResult, PodRef, PodRunnerError, StdinUnsupportedError

from .instance import LocalInstance


@dataclass(frozen=True)
class RecordedCall:
    """One ``run`` call: where, what, and how it ended (None: it raised)."""

    pod: PodRef
    argv: tuple[str, ...]
    stdin_bytes: int | None
    returncode: int | None


class LocalPodRunner:
    """Runs argv against local Postfix instances registered as pods."""

    def __init__(self, pods: Mapping[PodRef, LocalInstance] | None = None, *,
                 stdin_supported: bool = True) -> None:
        self._pods: dict[PodRef, LocalInstance] = dict(pods or {})
        self.stdin_supported = stdin_supported
        self.calls: list[RecordedCall] = []

    def add(self, pod: PodRef, instance: LocalInstance) -> None:
        """Register ``instance`` as ``pod``."""
        self._pods[pod] = instance

    def remove(self, pod: PodRef) -> None:
        """Forget ``pod``: later calls fail as for a deleted pod."""
        self._pods.pop(pod, None)

    def instance(self, pod: PodRef) -> LocalInstance:
        """The instance behind ``pod``."""
        return self._pods[pod]

    @property
    def pods(self) -> list[PodRef]:
        return sorted(self._pods)

    def calls_for(self, pod: PodRef) -> list[RecordedCall]:
        return [c for c in self.calls if c.pod == pod]

    async def run(self, pod: PodRef, argv: Sequence[str], *, stdin: bytes | None = None,
                  timeout: float = 60.0) -> ExecResult:
        """Run ``argv`` in ``pod``; see the module docstring for failures."""
        args = tuple(argv)
        try:
            result = await self._run(pod, args, stdin, timeout)
        except PodRunnerError:
            self.calls.append(RecordedCall(pod, args, _len(stdin), None))
            raise
        self.calls.append(RecordedCall(pod, args, _len(stdin), result.returncode))
        return result

    async def _run(self, pod: PodRef, argv: tuple[str, ...], stdin: bytes | None,
                   timeout: float) -> ExecResult:
        if not argv:
            raise PodRunnerError("empty argv")
        inst = self._pods.get(pod)
        if inst is None:
            raise PodRunnerError(f'pods "{pod.name}" not found in namespace "{pod.namespace}"')
        if not inst.running:
            raise PodRunnerError(f'container "{pod.container}" in pod {pod} is not running')
        if stdin is not None and not self.stdin_supported:
            raise StdinUnsupportedError(
                f"exec into {pod}: the server speaks only v4.channel.k8s.io, stdin cannot "
                "be closed")
        try:
            proc = await asyncio.create_subprocess_exec(
                *inst.command(argv),
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=inst.env, cwd=inst.root, start_new_session=True)
        except OSError as exc:  # what the exec API says for a missing binary
            return ExecResult(126, b"", f"exec: {argv[0]}: {exc.strerror}\n".encode())
        try:  # not asyncio.wait_for, which can lose a cancellation: mailtls_operator.aio
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate(stdin)
        except TimeoutError:
            _kill_group(proc.pid)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await proc.wait()
            raise PodRunnerError(
                f"exec into {pod}: {argv[0]} did not finish within {timeout:g}s") from None
        except asyncio.CancelledError:
            _kill_group(proc.pid)
            raise
        assert proc.returncode is not None
        return ExecResult(proc.returncode, out, err)


def _kill_group(pgid: int) -> None:
    """SIGKILL the command's own session (started with start_new_session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _len(stdin: bytes | None) -> int | None:
    return None if stdin is None else len(stdin)
