"""``mailtls validate|render|explain`` on hostile metadata: exit 2 with one line naming
the field, or (an unset namespace) the documented normalisation -- never a traceback."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from mailtls_operator import cli

NOW = "9999-12-30T12:00:00Z"  # inside the exception window, 1.5 days before it ends
SPEC = {"destinations": ["a.example"], "level": "may",
        "exception": {"startsAt": "9999-12-30T00:00:00Z", "expiresAt": "9999-12-31T23:59:59Z",
                      "reason": "INC-1"}}


def _run(tmp_path: Path, command: str, meta: Any, *extra: str) -> tuple[int, str, str]:
    path = tmp_path / "p.json"  # JSON: the metadata's types reach the model unchanged
    path.write_text(json.dumps({"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy",
                                "metadata": meta, "spec": SPEC}), encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    args = [command, "-f", str(path)] + (["--now", NOW] if command != "explain" else [])
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([*args, *extra])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("command", ["validate", "render", "explain"])
@pytest.mark.parametrize("meta,field", [
    ({"name": "p", "namespace": 7}, "metadata.namespace"),
    ({"name": "p", "generation": "abc"}, "metadata.generation"),
    ({"name": "p", "generation": 1.5}, "metadata.generation"),
    ({"name": "p", "generation": 2**63}, "metadata.generation"),
    ({"name": "p", "creationTimestamp": "garbage"}, "metadata.creationTimestamp"),
    ({"name": "p", "creationTimestamp": "2026-01-01T00:00:00"}, "metadata.creationTimestamp"),
    ({"name": ["p"]}, "metadata.name"),
    (["p"], "metadata"),
])
def test_hostile_metadata_is_exit_2_and_one_line_naming_the_field(
        tmp_path: Path, command: str, meta: Any, field: str) -> None:
    extra = ("a.example",) if command == "explain" else ()
    code, out, err = _run(tmp_path, command, meta, *extra)
    assert code == 2, (out, err)
    assert field in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("namespace", [None, ""])
def test_an_unset_namespace_validates_as_the_default_one(tmp_path: Path,
                                                         namespace: Any) -> None:
    code, out, err = _run(tmp_path, "render", {"name": "p", "namespace": namespace})
    assert code == 0, err
    assert "# default/p" in out and "a.example may" in out
