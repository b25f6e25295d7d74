"""``ProcessRunner``: the :class:`~..podrunner.PodRunner` seam, run in the agent's own container.

The agent converges its pod with the very argv the ``exec`` strategy sends
through the Kubernetes exec API (:mod:`..rollout`, :mod:`..probe`,
:mod:`..mailqueue`), so there is one staging/postmap/swap/verify logic, not
two.  Here the argv runs as a local subprocess: no shell, stdin written then
closed, ``MAIL_CONFIG`` pointing at the pod's Postfix configuration, the whole
process group killed after ``timeout``.  The ``pod`` argument is ignored: the
only pod an agent can touch is its own.

The four file steps of a rollout (:func:`..postfix.write_file`,
``sha256_file``, ``move``, ``remove``: the exact argv shapes those build) are
done in-process with the same results (byte count, ``sha256sum`` output,
rename(2), unlink) instead of forking ``sh``, ``sha256sum``, ``mv`` and ``rm``:
half of a rollout's commands, and most of its time on a busy node
(``make bench``).  Postfix's own tools always run as themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

from .. import postfix
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
        native = _native(list(argv), stdin)
        if native is not None:
            return native
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


def _native(argv: list[str], stdin: bytes | None) -> ExecResult | None:
    """The file steps, in-process, answering as the command would; None: not one of them."""
    try:
        if argv[:4] == ["sh", "-c", postfix.WRITE_SCRIPT, "mailtls-write"] and len(argv) == 5:
            data = stdin or b""
            fd = os.open(argv[4], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(argv[4], 0o644)  # as under umask 022, whatever this process's umask
            return ExecResult(0, f"{len(data)}\n".encode())
        if argv[:2] == ["sha256sum", "--"] and len(argv) == 3:
            digest = hashlib.sha256(Path(argv[2]).read_bytes()).hexdigest()
            return ExecResult(0, f"{digest}  {argv[2]}\n".encode())
        if argv[:3] == ["mv", "-f", "--"] and len(argv) == 5:
            os.replace(argv[3], argv[4])
            return ExecResult(0)
        if argv[:3] == ["rm", "-f", "--"]:
            for path in argv[3:]:
                Path(path).unlink(missing_ok=True)
            return ExecResult(0)
    except OSError as exc:
        return ExecResult(1, b"", f"{argv[0]}: {exc.filename}: {exc.strerror}\n".encode())
    return None
