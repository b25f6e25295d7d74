"""``mailtls render`` / ``validate`` as a CI pipeline runs them: files, exit codes, streams."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from mailtls_operator.cli import build_parser
from mailtls_operator.cli.logs import JsonFormatter
from mailtls_operator.render import REVISION_KEY

MAILTLS = str(Path(sys.executable).with_name("mailtls"))
EXAMPLES = Path(__file__).parents[2] / "manifests" / "examples"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MAILTLS, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """apiVersion: mailtls.io/v1alpha1
kind: MailTLSPolicy
metadata: {name: partner, namespace: mail}
spec: {destinations: [Partner.Example.], level: encrypt, instances: [relay]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
data: {a: b}
---
apiVersion: mailtls.io/v1alpha1
kind: MailTLSPolicy
metadata: {name: edge-only, namespace: mail}
spec: {destinations: [edge.example], level: may, instances: [edge]}
"""


def test_render_prints_the_table_and_postmap_syntax(tmp_path: Path) -> None:
    out = run("render", "-f", str(write(tmp_path, "p.yaml", GOOD)))
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln and not ln.startswith("#")]
    assert lines[0].startswith(f"{REVISION_KEY} secure match=rev-")
    assert lines[1:] == ["edge.example may", "partner.example encrypt"]


def test_render_for_an_instance_keeps_policies_for_it_or_for_all(tmp_path: Path) -> None:
    out = run("render", "-f", str(write(tmp_path, "p.yaml", GOOD)), "--instance", "relay")
    assert out.returncode == 0
    assert "partner.example encrypt" in out.stdout and "edge.example" not in out.stdout
    out = run("render", "-f", str(tmp_path), "--instance", "other/relay")
    assert "partner.example" not in out.stdout


def test_render_of_the_examples_directory_recurses(tmp_path: Path) -> None:
    out = run("render", "-f", str(EXAMPLES))
    assert out.returncode == 0, out.stderr
    assert "payroll.example.com encrypt" in out.stdout
    assert "xn--bcher-kva.example encrypt" in out.stdout and "bücher.example encrypt" in out.stdout
    transport = run("render", "-f", str(EXAMPLES), "--table", "transport")
    assert "insurer.example.com smtp:insurer.example.com" in transport.stdout


@pytest.mark.parametrize("command", ["render", "validate"])
def test_an_invalid_object_exits_2_with_nothing_on_stdout(tmp_path: Path, command: str) -> None:
    bad = write(tmp_path, "bad.yaml", GOOD.replace("level: encrypt,", "level: encrypt, "
                                                   "match: [nexthop],"))
    out = run(command, "-f", str(bad))
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.strip() == (f"{bad}: mail/partner: spec.match: match is only valid with "
                                  "level fingerprint, verify or secure")


def test_every_error_of_every_file_is_one_line(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD.replace("Partner.Example.", "a b").replace("level: may",
                                                                               "level: maybe"))
    out = run("validate", "-f", str(tmp_path))
    assert out.returncode == 2
    errors = out.stderr.strip().splitlines()
    assert len(errors) == 2
    assert "mail/partner: spec.destinations[0]: Invalid value" in errors[0]
    assert "mail/edge-only: spec.level: Unsupported value" in errors[1]


def test_non_utf8_and_broken_yaml_are_refused_not_crashed_on(tmp_path: Path) -> None:
    raw = tmp_path / "latin1.yaml"
    raw.write_bytes(GOOD.replace("partner", "p\xe4rtner").encode("latin-1"))
    out = run("validate", "-f", str(raw))
    assert out.returncode == 2 and "not UTF-8" in out.stderr and out.stdout == ""
    out = run("render", "-f", str(write(tmp_path, "broken.yaml", "spec: [unclosed\n")))
    assert out.returncode == 2 and "invalid YAML" in out.stderr and out.stdout == ""
    out = run("render", "-f", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "no such file" in out.stderr


def test_conflicts_are_warnings_on_stderr_and_exit_0(tmp_path: Path) -> None:
    twice = GOOD + """---
apiVersion: mailtls.io/v1alpha1
kind: MailTLSPolicy
metadata: {name: stricter, namespace: mail, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {destinations: [partner.example], level: secure, match: [nexthop]}
"""
    out = run("render", "-f", str(write(tmp_path, "c.yaml", twice)))
    assert out.returncode == 0
    assert "partner.example secure match=nexthop" in out.stdout
    assert "warning: mail/partner: partner.example: Conflict: mail/stricter wins" in out.stderr


def test_the_same_object_twice_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD)
    write(tmp_path, "b.yaml", GOOD)
    out = run("validate", "-f", str(tmp_path))
    assert out.returncode == 2 and "Duplicate value: also defined in" in out.stderr


def test_help_explains_every_command() -> None:
    for args in (["--help"], ["render", "--help"], ["validate", "--help"], ["run", "--help"],
                 ["probe", "--help"]):
        out = run(*args)
        assert out.returncode == 0 and "usage: mailtls" in out.stdout


def test_json_log_lines_are_json_whatever_the_message_holds() -> None:
    record = logging.LogRecord("mailtls.controller", logging.WARNING, __file__, 1,
                               "status of %s not written: %s", ("mail/p", 'say "no"\\\nbye é'),
                               None)
    doc = json.loads(JsonFormatter().format(record))
    assert doc["level"] == "WARNING" and doc["logger"] == "mailtls.controller"
    assert doc["message"] == 'status of mail/p not written: say "no"\\\nbye é'
    assert doc["time"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exception"]


def test_run_accepts_the_log_formats_and_refuses_others() -> None:
    parser = build_parser()
    assert parser.parse_args(["run"]).log_format == "json"
    assert parser.parse_args(["run", "--log-format", "text"]).log_format == "text"
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--log-format", "xml"])
