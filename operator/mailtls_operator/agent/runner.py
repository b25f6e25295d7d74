"""``ProcessRunner``: the :class:`~..podrunner.PodRunner` seam, run in the agent's own container.

The agent converges its pod with the very argv the ``exec`` strategy sends
through the Kubernetes exec API (:mod:`..rollout`, :mod:`..probe`,
:mod:`..mailqueue`), so there is one staging/postmap/swap/verify logic, not
two.  Here the argv runs as a local subprocess: no shell, stdin written then
closed, ``MAIL_CONFIG`` pointing at the pod's Postfix configuration, the whole
process group killed after ``timeout``.  The ``pod`` argument is ignored: the
only pod an agent can touch is its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence

from ..podrunner import ExecResult, PodRef, PodRunnerError


class ProcessRunner:
    """Runs argv in this container, with the pod's Postfix configuration directory."""

    def __init__(self, config_dir: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        base = dict(os.environ if env is None else env)
        if config_dir:
            base["MAIL_CONFIG"] = config_dir
        self.env = base
        self.commands = 0
        """How many commands ran (the bench counts them per rollout)."""

    async def run(self, pod: PodRef, argv: Sequence[str], *, stdin: bytes | None = None,
                  timeout: float = 60.0) -> ExecResult:
        """Run ``argv``; a command that outlives ``timeout`` raises :class:`PodRunnerError`."""
        if not argv:
            raise PodRunnerError("empty argv")
        self.commands += 1
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=self.env, start_new_session=True)
        except OSError as exc:  # the same words the exec API gives for a missing binary
            return ExecResult(126, b"", f"exec: {argv[0]}: {exc.strerror}\n".encode())
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if isinstance(exc, asyncio.CancelledError):
                raise
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5.0)
            raise PodRunnerError(f"{argv[0]} did not finish within {timeout:g}s") from None
        assert proc.returncode is not None
        return ExecResult(proc.returncode, out, err)
