"""The TLSRPT example's main.cf (manifests/examples/postfix-agent-tlsrpt) as real Postfix
reads it: 3.10 knows every line and turns TLSRPT on, and the agent, from that ``postconf
-x``, binds its socket in the directory the overlay shares between the containers; 3.7
(Debian bookworm's, the default example image) does not know the two lines and says so."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mailtls_operator.agent.tlsrpt import socket_path
from testbed import postfix_unavailable
from testbed.postfixroot import build_for

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "manifests" / "examples" / "postfix-agent-tlsrpt"
NAMES = ("mail_version", "queue_directory", "smtp_tlsrpt_enable", "smtp_tlsrpt_socket_name",
         "smtp_dns_support_level", "smtp_tls_security_level")


@pytest.fixture
def config_dir() -> Iterator[Path]:
    """A configuration directory with the overlay's main.cf, where a 3.10 root sees it."""
    directory = Path(tempfile.mkdtemp(prefix="mailtls-tlsrpt-cf-"))
    directory.chmod(0o755)
    shutil.copy(OVERLAY / "main.cf", directory / "main.cf")
    yield directory
    build_for("3.10").forget(directory)
    shutil.rmtree(directory, ignore_errors=True)


def _postconf(version: str, directory: Path) -> subprocess.CompletedProcess[str]:
    why = postfix_unavailable(version)
    if why is not None:
        pytest.skip(f"Postfix {version} cannot run here: {why}")
    build = build_for(version)
    shutil.copy(build.host_path("/etc/postfix/master.cf"), directory / "master.cf")  # its own
    argv = build.command(["postconf", "-c", str(directory), "-x", *NAMES], directory)
    return subprocess.run(argv, capture_output=True, text=True, timeout=30,
                          check=False)


def _shared_mount() -> str:
    patch = yaml.safe_load((OVERLAY / "tlsrpt-volume.yaml").read_text())
    mounts = {c["name"]: [m["mountPath"] for m in c["volumeMounts"] if m["name"] == "tlsrpt"]
              for c in patch["spec"]["template"]["spec"]["containers"]}
    assert mounts["postfix"] == mounts["agent"] and len(mounts["agent"]) == 1, mounts
    return str(mounts["agent"][0])


def test_postfix_310_takes_the_example_and_the_agent_binds_in_the_shared_volume(
        config_dir: Path) -> None:
    done = _postconf("3.10", config_dir)
    assert done.returncode == 0 and done.stderr == "", done.stderr  # no unknown parameter
    values = dict(line.split(" = ", 1) for line in done.stdout.splitlines())
    assert values["mail_version"].startswith("3.10.")
    assert values["smtp_tlsrpt_enable"] == "yes"
    path, problem = socket_path(values)
    assert problem == "" and path is not None
    assert path.rsplit("/", 1)[0] == _shared_mount() == "/var/spool/postfix/tlsrpt"


def test_postfix_37_does_not_know_the_two_lines_and_warns(config_dir: Path) -> None:
    done = _postconf("3.7", config_dir)
    assert "smtp_tlsrpt_enable: unknown parameter" in done.stderr
    assert "smtp_tlsrpt_socket_name: unknown parameter" in done.stderr
