"""The agent's ProcessRunner: the file steps it does in-process answer exactly as the
commands they stand for (run here for real), and everything else runs as a subprocess."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from mailtls_operator import postfix
from mailtls_operator.agent.runner import ProcessRunner
from mailtls_operator.podrunner import PodRef, PodRunnerError

POD = PodRef("mail", "relay-0", "agent")


def real(argv: list[str], stdin: bytes | None = None) -> tuple[int, bytes]:
    res = subprocess.run(argv, input=stdin, capture_output=True, timeout=10, check=False)
    return res.returncode, res.stdout


def run(argv: list[str], stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
    res = asyncio.run(ProcessRunner().run(POD, argv, stdin=stdin))
    return res.returncode, res.stdout, res.stderr


def test_write_is_the_scripts_byte_count_and_mode(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "a", tmp_path / "b"
    data = "k encrypt\nü may\n".encode()
    code, out, _ = run(postfix.write_file(str(ours)), data)
    assert (code, out) == real(postfix.write_file(str(theirs)), data)
    assert ours.read_bytes() == theirs.read_bytes() == data
    assert ours.stat().st_mode & 0o777 == theirs.stat().st_mode & 0o777 == 0o644


def test_sha256_move_and_remove_answer_like_the_commands(tmp_path: Path) -> None:
    (tmp_path / "t").write_bytes(b"x y\n")
    assert run(postfix.sha256_file(str(tmp_path / "t")))[:2] == real(
        postfix.sha256_file(str(tmp_path / "t")))
    missing = str(tmp_path / "missing")
    code, _, err = run(postfix.sha256_file(missing))
    assert code != 0 and real(postfix.sha256_file(missing))[0] != 0
    assert b"No such file" in err
    assert run(postfix.move(str(tmp_path / "t"), str(tmp_path / "u")))[0] == 0
    assert not (tmp_path / "t").exists() and (tmp_path / "u").read_bytes() == b"x y\n"
    assert run(postfix.move(missing, str(tmp_path / "v")))[0] != 0
    assert run(postfix.remove([str(tmp_path / "u"), missing]))[0] == 0
    assert not (tmp_path / "u").exists()


def test_other_commands_run_as_subprocesses_with_the_postfix_config(tmp_path: Path) -> None:
    runner = ProcessRunner(config_dir=str(tmp_path))
    res = asyncio.run(runner.run(POD, ["sh", "-c", 'printf %s "$MAIL_CONFIG"']))
    assert (res.returncode, res.stdout) == (0, str(tmp_path).encode())
    res = asyncio.run(runner.run(POD, ["/nonexistent/postmap"]))
    assert res.returncode == 127 and b"/nonexistent/postmap" in res.stderr

    async def too_slow() -> None:
        with pytest.raises(PodRunnerError, match="did not finish"):
            await runner.run(POD, ["sleep", "5"], timeout=0.2)
        await asyncio.sleep(0.1)  # the killed process's pipes close in this loop, not at GC

    asyncio.run(too_slow())
    assert runner.commands == 3
