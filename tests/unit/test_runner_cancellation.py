"""A pod command cancelled just as it finishes ends cancelled, in every runner.

``asyncio.wait_for`` on Python 3.11 returns the result instead of the cancellation when
both arrive in the same turn of the event loop (gh-86296).  The agent's observer runs a
command every few hundred milliseconds; a lost cancellation there kept it running after
the agent was stopped, and stopping it never returned (the hang of
tests/postfix/test_agent.py in `make test`).  Each case finishes the command and cancels
its caller in one turn, deterministically.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from mailtls_operator.agent.runner import ProcessRunner
from mailtls_operator.cli.probe import HostRunner
from mailtls_operator.execrunner import KubernetesExecRunner
from mailtls_operator.podrunner import ExecResult, PodRef
from mailtls_operator.probe import ProbeTimeouts
from mailtls_operator.probe.run import _run as run_probe
from testbed import LocalInstance, LocalPodRunner

POD = PodRef("mail", "relay-0")


class Gate:
    """Holds a finished command back until the test finishes it and cancels its caller
    in the same turn of the event loop."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.open: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def hold(self) -> None:
        self.reached.set()
        await self.open

    async def finish_and_cancel(self, caller: Awaitable[Any], turns: int) -> None:
        """Let the held command finish, cancel its caller ``turns`` turns later, and
        check that a caller still running then ends cancelled."""
        task = asyncio.ensure_future(caller)
        await asyncio.wait_for(self.reached.wait(), 10)
        self.open.set_result(None)
        for _ in range(turns):  # the result travels up through futures and callbacks
            await asyncio.sleep(0)
        running = not task.done()
        task.cancel()
        await asyncio.wait([task], timeout=10)
        assert running or turns > 0, "the caller was done before the cancellation"
        assert task.cancelled() or not running, f"the cancellation was lost: {task.result()!r}"


TURNS = pytest.mark.parametrize("turns", range(4))


def gated_subprocesses(monkeypatch: pytest.MonkeyPatch, gate: Gate) -> None:
    """Real subprocesses whose ``communicate`` answers only once the gate opens."""
    spawn = asyncio.create_subprocess_exec

    async def gated_spawn(*argv: Any, **kwargs: Any) -> Any:
        proc = await spawn(*argv, **kwargs)
        communicate = proc.communicate

        async def held(data: bytes | None = None) -> tuple[bytes, bytes]:
            out = await communicate(data)
            await gate.hold()
            return out
        proc.communicate = held  # type: ignore[method-assign,assignment]
        return proc
    monkeypatch.setattr(asyncio, "create_subprocess_exec", gated_spawn)


def local_runner(tmp_path: Path) -> LocalPodRunner:
    inst = SimpleNamespace(running=True, command=list, env=dict(os.environ), root=tmp_path)
    return LocalPodRunner({POD: cast(LocalInstance, inst)})


RUNNERS: dict[str, Callable[[Path], Any]] = {
    "HostRunner": lambda _: HostRunner(),
    "agent ProcessRunner": lambda _: ProcessRunner(),
    "testbed LocalPodRunner": local_runner,
}


@TURNS
@pytest.mark.parametrize("make", RUNNERS.values(), ids=RUNNERS.keys())
async def test_a_command_cancelled_as_it_finishes_ends_cancelled(
        make: Callable[[Path], Any], turns: int, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate()
    gated_subprocesses(monkeypatch, gate)
    await gate.finish_and_cancel(make(tmp_path).run(POD, ["true"], timeout=30), turns)


@TURNS
async def test_a_probe_cancelled_as_its_command_finishes_ends_cancelled(turns: int) -> None:
    gate = Gate()

    class Runner:
        async def run(self, pod: PodRef, argv: Any, *, stdin: bytes | None = None,
                      timeout: float = 60.0) -> ExecResult:
            await gate.hold()
            return ExecResult(0, b"", b"")

    await gate.finish_and_cancel(
        run_probe(Runner(), POD, ["posttls-finger", "x"], ProbeTimeouts()), turns)


@TURNS
async def test_an_exec_cancelled_as_it_finishes_ends_cancelled(turns: int) -> None:
    gate = Gate()
    runner = KubernetesExecRunner(None)

    async def work(*_: Any) -> ExecResult:  # the exec's worker, its answer just in
        await gate.hold()
        return ExecResult(0, b"", b"")
    runner._work = work  # type: ignore[method-assign,assignment]
    await gate.finish_and_cancel(runner.run(POD, ["true"], timeout=30), turns)
