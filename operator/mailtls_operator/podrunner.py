"""The one seam through which the operator runs commands inside Postfix pods.

Everything that touches a pod's filesystem or Postfix (postmap, postfix reload,
postconf, postqueue, posttls-finger) goes through :class:`PodRunner` as an argv
list plus optional stdin bytes.  Production uses the Kubernetes exec API
(:mod:`mailtls_operator.execrunner`); the test suite and ``make demo`` use
:mod:`testbed.runner`, which runs the same argv against real local
Postfix instances.  Tests inject a runner; nothing patches import paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, order=True)
class PodRef:
    """A container in a pod: where an argv is run."""

    namespace: str
    name: str
    container: str = "postfix"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ExecResult:
    """What a command run in a pod produced.

    ``notes`` carries facts about the transport that a person should see in
    status (e.g. that the server spoke only ``v4.channel.k8s.io``).
    """

    returncode: int
    stdout: bytes = b""
    stderr: bytes = b""
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def message(self) -> str:
        """Postfix's own words: the last non-empty stderr (or stdout) line."""
        for stream in (self.stderr, self.stdout):
            lines = [ln.strip() for ln in stream.decode("utf-8", "replace").splitlines()]
            lines = [ln for ln in lines if ln]
            if lines:
                return lines[-1]
        return f"exit status {self.returncode}"


class PodRunnerError(Exception):
    """The command could not be run at all (pod gone, transport failure, timeout)."""


class StdinUnsupportedError(PodRunnerError):
    """The transport cannot give the command's stdin an end (no ``v5.channel.k8s.io``).

    Over ``v4.channel.k8s.io`` and older exec protocols stdin can never be
    closed, so a command reading it (``postmap -i``, ``cat``) would wait for
    ever.  Raised before any stdin is sent; callers fall back to a path that
    needs no stdin (e.g. ``postmap`` on the table from the ConfigMap mounted in
    the pod) and say so in status.
    """


class PodRunner(Protocol):
    """Run ``argv`` in ``pod`` with optional ``stdin``; return its exit status and output.

    Implementations must never pass ``argv`` through a shell, must close stdin
    after writing it (so ``cat``/``postmap`` see EOF), and must give up after
    ``timeout`` seconds by raising :class:`PodRunnerError`.
    """

    async def run(
        self,
        pod: PodRef,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        timeout: float = 60.0,
    ) -> ExecResult: ...
