"""``ProcessRunner``: the :class:`~..podrunner.PodRunner` seam, run in the agent's own container.

The agent converges its pod with the very argv the ``exec`` strategy sends
through the Kubernetes exec API (:mod:`..rollout`, :mod:`..probe`,
:mod:`..mailqueue`), so there is one staging/postmap/swap/verify logic, not
two.  Here the argv runs as a local subprocess: no shell, stdin written then
closed, ``MAIL_CONFIG`` pointing at the pod's Postfix configuration, the whole
process group killed after ``timeout``: ``mailtls probe``'s host runner.  The
``pod`` argument is ignored: the only pod an agent can touch is its own.

The four file steps of a rollout (:func:`..postfix.write_file`,
``sha256_file``, ``move``, ``remove``: the exact argv shapes those build) are
done in-process with the same results (byte count, ``sha256sum`` output,
rename(2), unlink) instead of forking ``sh``, ``sha256sum``, ``mv`` and ``rm``:
half of a rollout's commands, and most of its time on a busy node
(``make bench``).  Postfix's own tools always run as themselves.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .. import postfix
from ..cli.probe import HostRunner
from ..podrunner import ExecResult, PodRef


class ProcessRunner(HostRunner):
    """:class:`~..cli.probe.HostRunner` (no shell, ``MAIL_CONFIG``, timeouts, process-group
    kill) plus the file steps in-process; ``env`` replaces the environment (tests)."""

    def __init__(self, config_dir: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        super().__init__(config_dir)
        if env is not None:
            self.env = {**env, **({"MAIL_CONFIG": config_dir} if config_dir else {})}
        self.commands = 0
        """How many commands ran (the bench counts them per rollout)."""

    async def run(self, pod: PodRef, argv: Sequence[str], *, stdin: bytes | None = None,
                  timeout: float = 60.0) -> ExecResult:
        """Run ``argv``; a command that outlives ``timeout`` raises ``PodRunnerError``."""
        self.commands += 1
        native = _native(list(argv), stdin) if argv else None
        if native is not None:
            return native
        return await super().run(pod, argv, stdin=stdin, timeout=timeout)


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
