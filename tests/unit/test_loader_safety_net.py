"""The CLI's last-resort guard: a failure no layer foresaw is still one line and exit 2
(the real fixes are where each failure arises; this only keeps a traceback out of CI)."""

from __future__ import annotations

import argparse
import importlib

import pytest

from mailtls_operator.cli import main as cli_main

main_module = importlib.import_module("mailtls_operator.cli.main")  # the name is the function


def _explodes(args: argparse.Namespace) -> int:
    raise RuntimeError("boom\nforged line")


def _recurses(args: argparse.Namespace) -> int:
    return _recurses(args)


@pytest.mark.parametrize(("func", "needle"), [(_explodes, "unexpected RuntimeError: boom\\n"),
                                              (_recurses, "nested too deeply")])
def test_an_unforeseen_failure_is_one_line_and_exit_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        func: object, needle: str) -> None:
    real = main_module.build_parser

    def parser() -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = real()
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices["validate"].set_defaults(func=func)
        return p

    monkeypatch.setattr(main_module, "build_parser", parser)
    assert cli_main(["validate", "-f", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
