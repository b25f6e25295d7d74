"""The loader through the real entry point (issue 22, items 5, 7 and 10): files, kinds,
bounds and output, each run as ``mailtls`` is run in CI, each bounded in time (10 s) and
memory (300 MiB, the child's peak RSS measured with ``wait4``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MAILTLS = str(Path(sys.executable).with_name("mailtls"))
SECONDS, MIB = 10.0, 300

POLICY = """apiVersion: mailtls.io/v1alpha1
kind: MailTLSPolicy
metadata: {{name: {name}}}
spec: {{destinations: [{name}.example], level: encrypt}}
"""


@dataclass
class Run:
    status: int
    stdout: str
    stderr: str
    seconds: float
    peak_mib: float


TIME = shutil.which("time", path="/usr/bin:/bin")
"""GNU time measures the command's own peak RSS: ``wait4`` on a child forked from this
(large) pytest process would report pytest's size too (Linux carries the pre-exec
high-water mark across exec)."""


def mailtls(*args: str, stdin: bytes = b"", cwd: str | None = None,
            prefix: Sequence[str] = ()) -> Run:
    """Run the installed command; its time and peak RSS are measured and bounded."""
    if TIME is None:
        pytest.skip("GNU time (/usr/bin/time) is needed to measure the peak RSS")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile() as rss:
        argv = [TIME, "-f", "%M", "-o", rss.name, *prefix, MAILTLS, *args]
        run = _measured(argv, stdin, cwd, out, err)
        run.peak_mib = int(Path(rss.name).read_text().split()[-1]) / 1024
    assert run.peak_mib < MIB, run
    return run


def _measured(argv: list[str], stdin: bytes, cwd: str | None, out: IO[bytes],
              err: IO[bytes]) -> Run:
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=cwd,
                            start_new_session=True)
    assert proc.stdin is not None
    try:
        proc.stdin.write(stdin)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # the command stopped reading (a bound): that is the point
    try:
        status = proc.wait(timeout=max(0.1, start + SECONDS - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        pytest.fail(f"{argv!r} ran over {SECONDS} s")
    seconds = time.monotonic() - start
    out.seek(0)
    err.seek(0)
    run = Run(status, out.read().decode(), err.read().decode(errors="replace"), seconds, 0.0)
    assert "Traceback" not in run.stderr, run.stderr
    return run


def refused(run: Run, *needles: str) -> str:
    """The one error line of a refusal (exit 2, nothing on stdout), holding each needle."""
    assert run.status == 2, run
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_dev_zero_is_refused_after_the_size_limit() -> None:
    refused(mailtls("validate", "-f", "/dev/zero"), "/dev/zero: larger than 3145728 bytes")


def test_proc_self_mem_is_an_error_line() -> None:
    refused(mailtls("validate", "-f", "/proc/self/mem"), "/proc/self/mem: cannot read")


def test_an_empty_path_is_refused_not_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("bad: [")
    refused(mailtls("validate", "-f", "", cwd=str(tmp_path)), "empty path")


def test_dash_reads_standard_input() -> None:
    run = mailtls("validate", "-f", "-", stdin=POLICY.format(name="s").encode())
    assert run.status == 0 and run.stderr == "1 MailTLSPolicy object(s) valid\n"
    run = mailtls("render", "-f", "-", stdin=POLICY.format(name="s").encode())
    assert "s.example encrypt" in run.stdout


def test_standard_input_past_the_limit_is_refused() -> None:
    refused(mailtls("validate", "-f", "-", stdin=b"#" * (3 * 1024 * 1024 + 10)),
            "<stdin>: larger than")


README = Path(__file__).parents[2] / "README.md"


def test_an_unquoted_time_in_the_readme_break_glass_example_validates(tmp_path: Path) -> None:
    """The README's break-glass ``spec``, its times unquoted (kubectl keeps them strings)."""
    text = README.read_text(encoding="utf-8")
    block = text[text.index("```yaml\nspec:\n  destinations: [\"[mx.partner"):]
    spec = block[len("```yaml\n"):block.index("```", 3)]
    unquoted = re.sub(r'"(\d{4}-\d\d-\d\dT[0-9:]+Z)"', r"\1", spec)
    assert unquoted != spec and "expiresAt: 2026-" in unquoted
    path = tmp_path / "bg.yaml"
    path.write_text("apiVersion: mailtls.io/v1alpha1\nkind: MailTLSPolicy\n"
                    "metadata: {name: bg}\n" + unquoted)
    run = mailtls("validate", "--now", "2026-11-26T00:00:00Z", "-f", str(path))
    assert run.status == 0 and run.stderr == "1 MailTLSPolicy object(s) valid\n", run


def test_a_duplicate_field_is_refused_not_last_wins(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("apiVersion: mailtls.io/v1alpha1\nkind: MailTLSPolicy\n"
                    "metadata: {name: d}\nspec:\n  destinations: [d.example]\n"
                    "  level: encrypt\n  level: none\n")
    for argv in (["validate"], ["render"], ["probe"], ["explain", "d.example"]):
        refused(mailtls(*argv, "-f", str(path)),
                'line 7, column 3: mapping key "level" already defined at line 6')


@pytest.mark.parametrize(("api", "kind", "needle"), [
    ("mailtls.io/v9", "MailTLSPolicy", 'in version "mailtls.io/v9"'),
    ("mailtls.io/", "MailTLSPolicy", 'in version "mailtls.io/"'),
    ("mailtls.io", "MailTLSPolicy", 'in version "mailtls.io"'),
    ("mailtls.io/v1alpha1", "MailTlsPolicy", 'no matches for kind "MailTlsPolicy"'),
    ("mailtls.io/v1alpha1", "MailTLSPolicyList", "kind"),
])
def test_our_group_with_a_version_or_kind_the_crds_do_not_serve_is_refused(
        tmp_path: Path, api: str, kind: str, needle: str) -> None:
    path = tmp_path / "k.yaml"
    body = "items: [{apiVersion: mailtls.io/v2, kind: MailTLSPolicy}]\n" \
        if kind.endswith("List") else "metadata: {name: x}\n"
    path.write_text(f"apiVersion: {api}\nkind: {kind}\n{body}")
    refused(mailtls("validate", "-f", str(path)), needle)


def test_other_groups_are_skipped_and_discovery_objects_judged(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n---\n"
        "apiVersion: mailtls.io/v1alpha1\nkind: MailTLSDiscovery\nmetadata: {name: d}\n"
        "spec: {domains: [a.example]}\n---\n" + POLICY.format(name="p"))
    run = mailtls("validate", "-f", str(tmp_path))
    assert run.status == 0, run
    assert run.stderr == "1 MailTLSPolicy object(s), 1 MailTLSDiscovery object(s) valid\n"
    (tmp_path / "a.yaml").write_text(  # the server refuses an empty domain list: so do we
        "apiVersion: mailtls.io/v1alpha1\nkind: MailTLSDiscovery\nmetadata: {name: d}\n"
        "spec: {domains: []}\n")
    refused(mailtls("validate", "-f", str(tmp_path)), "spec.domains")


def test_an_alias_bomb_is_refused_in_bounded_time_and_memory(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    run = mailtls("validate", "-f", str(path))
    refused(run, "aliases expand to more than")


@pytest.mark.parametrize("form", ["yaml", "json"])
def test_nesting_thousands_deep_is_refused_in_any_kind(tmp_path: Path, form: str) -> None:
    path = tmp_path / f"deep.{form}"
    deep = "[" * 3000 + "]" * 3000
    path.write_text(f'{{"kind": "Other", "x": {deep}}}' if form == "json"
                    else f"kind: Other\nx: {deep}\n")
    refused(mailtls("validate", "-f", str(path)), "nest")


def test_a_large_valid_file_is_read_within_the_bounds(tmp_path: Path) -> None:
    """Near the 3 MiB limit: ~2,700 policies, every one decoded and validated."""
    path = tmp_path / "many.yaml"
    text = "---\n".join(POLICY.format(name=f"p{i}") for i in range(2700))
    path.write_text(text)
    run = mailtls("validate", "-f", str(path))
    assert run.status == 0 and "2700 MailTLSPolicy" in run.stderr, run


def test_a_secret_behind_a_symlink_is_never_echoed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.env"
    secret.write_text("db_password: hunter2 : oops\n")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "creds.yaml").symlink_to(secret)
    line = refused(mailtls("validate", "-f", str(tmp_path / "repo")), "line 1, column")
    assert "hunter2" not in line and "db_password" not in line


NAME_CHARS = st.characters(codec="utf-8", exclude_characters="/\x00",
                           )


@settings(max_examples=3, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(NAME_CHARS, min_size=1, max_size=10).map(lambda s: s + "\n3 MailTLSPolicy "
                                                        "object(s) valid\n\u202e.yaml"))
def test_a_file_name_cannot_forge_lines(tmp_path: Path, name: str) -> None:
    path = tmp_path / name[-200:]
    try:
        path.write_text("x: [")
    except OSError:  # a name the file system refuses
        return
    try:
        line = refused(mailtls("validate", "-f", str(tmp_path)), "invalid YAML")
        assert "\\n3 MailTLSPolicy" in line and "\\u202e" in line
    finally:
        path.unlink()


def test_a_megabyte_name_is_not_echoed_whole() -> None:
    line = refused(mailtls("validate", "-f", "a/" * 60_000 + "x.yaml"))  # ARG_MAX: 128 KiB
    assert len(line) < 400


def test_a_fifo_in_a_directory_walk_is_an_error_not_a_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.yaml")
    refused(mailtls("validate", "-f", str(tmp_path)), "pipe.yaml: not a regular file")


def test_a_dangling_link_in_a_directory_walk_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "gone.yaml").symlink_to(tmp_path / "nowhere.yaml")
    refused(mailtls("validate", "-f", str(tmp_path)), "gone.yaml: cannot read")


def test_links_to_directories_are_not_followed(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "p.yaml").write_text(POLICY.format(name="p"))
    (tmp_path / "real" / "loop").symlink_to(tmp_path)  # would loop if followed
    run = mailtls("validate", "-f", str(tmp_path))
    assert run.status == 0 and run.stderr == "1 MailTLSPolicy object(s) valid\n", run


# Root reads every mode-000 file: the child runs without the two capabilities that let it
# (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), as root still, so the venv stays reachable.
WITHOUT_DAC = ["setpriv", "--inh-caps=-all",
               "--bounding-set=-dac_override,-dac_read_search", "--"]


def _unprivileged() -> list[str]:
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: root reads mode-000 paths")
    return WITHOUT_DAC


def test_an_unreadable_directory_is_an_error_not_a_silent_skip(tmp_path: Path) -> None:
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "p.yaml").write_text(POLICY.format(name="p"))
    locked = tmp_path / "team-b"
    locked.mkdir()
    (locked / "q.yaml").write_text(POLICY.format(name="q"))
    locked.chmod(0o000)
    try:
        refused(mailtls("validate", "-f", str(tmp_path), prefix=_unprivileged()),
                "team-b: cannot list directory: Permission denied")
    finally:
        locked.chmod(0o755)


def test_an_unreadable_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.format(name="p"))
    path.chmod(0o000)
    for target in (str(path), str(tmp_path)):
        refused(mailtls("validate", "-f", target, prefix=_unprivileged()),
                "p.yaml: cannot read: Permission denied")


def test_a_megabyte_metadata_name_is_not_echoed_whole(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(POLICY.format(name="a" * 1_000_000))
    run = mailtls("validate", "-f", str(path))
    assert run.status == 2 and run.stderr.count("big.yaml") == len(run.stderr.splitlines())
    assert all(len(line) < 1200 for line in run.stderr.splitlines())
