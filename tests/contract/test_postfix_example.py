"""The example Postfix pod, run on this machine's real Postfix: the init container's
script and the image's entrypoint with the example main.cf, Postfix's master as PID 1
(in a PID namespace of its own, as in a container)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .kit import EXAMPLES, ROOT, find, kustomize

ENTRYPOINT = ROOT / "images" / "postfix" / "entrypoint.sh"
LOAD_TABLES = EXAMPLES / "postfix" / "load-tables.sh"
SBIN = Path("/usr/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _instance(tmp_path: Path, port: int) -> Path:
    """A config dir built the way images/postfix/Dockerfile builds /etc/postfix, with the
    example's main.cf (from the kustomize build) moved to throwaway directories."""
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("master.cf", "dynamicmaps.cf", "postfix-files"):
        if (Path("/etc/postfix") / name).is_file():
            shutil.copy(Path("/etc/postfix") / name, etc)
    for name in ("dynamicmaps.cf.d", "postfix-files.d"):
        if (Path("/etc/postfix") / name).is_dir():
            shutil.copytree(Path("/etc/postfix") / name, etc / name)
    objects = kustomize(EXAMPLES / "postfix")
    (config,) = [o for o in find(objects, "ConfigMap")
                 if o["metadata"]["name"].startswith("relay-postfix")]
    main_cf = config["data"]["main.cf"].replace("/var/lib/mailtls", str(tmp_path / "tables"))
    main_cf = re.sub(r"^inet_interfaces = .*$", "inet_interfaces = 127.0.0.1", main_cf,
                     flags=re.MULTILINE)
    main_cf += (f"queue_directory = {tmp_path / 'queue'}\n"
                f"data_directory = {tmp_path / 'data'}\n"
                f"maillog_file_prefixes = /dev/stdout\n")
    (etc / "main.cf").write_text(main_cf)
    postconf = [str(SBIN / "postconf"), "-c", str(etc)]
    subprocess.run([*postconf, "-F", "*/*/chroot = n"], check=True, timeout=10)
    master = (etc / "master.cf").read_text()
    (etc / "master.cf").write_text(re.sub(r"^smtp(\s+)inet", f"127.0.0.1:{port}\\1inet",
                                          master, count=1, flags=re.MULTILINE))
    for name in ("queue", "data", "tables"):
        (tmp_path / name).mkdir(mode=0o777)
        (tmp_path / name).chmod(0o777)  # what an emptyDir looks like
    return etc


@pytest.fixture
def world_readable_tmp() -> Iterator[Path]:
    """Postfix's daemons (user postfix) must reach the queue and data directories,
    which pytest's tmp_path (under a root-only 0700 directory) does not allow."""
    path = Path(tempfile.mkdtemp(prefix="mailtls-example-postfix-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.postfix
def test_example_postfix_starts_with_its_tables_as_pid_1(world_readable_tmp: Path) -> None:
    tmp_path = world_readable_tmp
    if os.geteuid() != 0 or not shutil.which("unshare") or not (SBIN / "postfix").exists():
        pytest.skip("needs root, unshare and Postfix (make system-deps)")
    types = subprocess.run([str(SBIN / "postconf"), "-c", "/nonexistent", "-m"],
                           capture_output=True, text=True, timeout=10, check=False).stdout
    port = _free_port()
    etc = _instance(tmp_path, port)
    if "lmdb" not in subprocess.run([str(SBIN / "postconf"), "-c", str(etc), "-m"],
                                    capture_output=True, text=True, timeout=10).stdout.split():
        pytest.skip(f"needs postfix-lmdb (table types here: {types.split()})")
    env = {"PATH": f"{SBIN}:/usr/bin:/bin", "MAIL_CONFIG": str(etc)}

    # The init container: no ConfigMap yet, so empty tables.
    subprocess.run(["sh", str(LOAD_TABLES)], check=True, timeout=30, capture_output=True,
                   env={**env, "SRC": str(tmp_path / "none"), "DST": str(tmp_path / "tables"),
                        "MAP_TYPE": "lmdb", "POSTFIX_CONFIG": str(etc)})

    # The container: the image's entrypoint as PID 1 of a new PID namespace.
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", str(ENTRYPOINT)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    banner = b""
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    banner = s.recv(200)
                    s.sendall(b"QUIT\r\n")
                break
            except OSError:
                time.sleep(0.2)
        if not banner:
            proc.kill()
            raise AssertionError(f"no SMTP banner; Postfix said: {proc.communicate()[0]}")
        assert banner.startswith(b"220 relay.mail.svc.cluster.local ESMTP"), banner
        # What the operator does next in the pod: postfix reload works on this instance.
        reload = subprocess.run([str(SBIN / "postfix"), "-c", str(etc), "reload"],
                                capture_output=True, text=True, timeout=30, env=env)
        assert reload.returncode == 0, reload.stderr
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=30)
    assert "daemon started" in output
    assert "master[1]" in output, "master must run as PID 1 (postfix start-fg)"
    assert "warning" not in output.lower(), output
    assert oct((tmp_path / "queue").stat().st_mode)[-3:] == "755"
