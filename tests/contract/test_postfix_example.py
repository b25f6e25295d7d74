"""The example Postfix pod, run on this machine's real Postfix: the init container's
script and the image's entrypoint with the example main.cf, Postfix's master as PID 1
(in a PID namespace of its own, as in a container)."""

from __future__ import annotations

import base64
import hashlib
import json
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
from typing import Any

import pytest

from mailtls_operator.configmap import LIMIT, configmap_bodies, part_name, reassemble
from mailtls_operator.policy import load_policy
from mailtls_operator.render import REVISION_KEY, Tables, render

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


# ------------------------------------------- load-tables.sh: every shape the operator writes


def _parts_default() -> str:
    match = re.search(r"^PARTS=\$\{PARTS:-([^}]+)\}$", LOAD_TABLES.read_text(), re.MULTILINE)
    assert match, "load-tables.sh has no PARTS default"
    return match.group(1)


def test_the_init_container_mounts_every_part_where_load_tables_looks_for_it() -> None:
    (deployment,) = find(kustomize(EXAMPLES / "postfix"), "Deployment", "relay")
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    parts = volumes[mounts[_parts_default()]]["projected"]["sources"]
    assert [s["configMap"]["name"] for s in parts] == \
        [part_name("relay", n) for n in range(1, len(parts) + 1)]
    assert all(s["configMap"]["optional"] is True for s in parts)
    assert len(parts) >= 4, "a million destinations take 4 parts"
    assert "PARTS" not in {e["name"] for e in init["env"]}  # the script's default is used


def _postmap_config(tmp_path: Path) -> tuple[Path, str]:
    """A config dir of our own with Debian's dynamicmaps (lmdb), and postmap; or skip."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "main.cf").write_text("compatibility_level = 3.6\n")
    if Path("/etc/postfix/dynamicmaps.cf").is_file():
        shutil.copy("/etc/postfix/dynamicmaps.cf", etc)
    if Path("/etc/postfix/dynamicmaps.cf.d").is_dir():
        shutil.copytree("/etc/postfix/dynamicmaps.cf.d", etc / "dynamicmaps.cf.d")
    postmap = SBIN / "postmap"
    if not postmap.exists():
        pytest.skip("needs Postfix (make system-deps)")
    types = subprocess.run([str(SBIN / "postconf"), "-c", str(etc), "-m"], capture_output=True,
                           text=True, timeout=10, check=False).stdout.split()
    if "lmdb" not in types:
        pytest.skip(f"needs postfix-lmdb (table types here: {types})")
    return etc, str(postmap)


def _mount(bodies: list[dict[str, Any]], src: Path, parts: Path) -> None:
    """What the kubelet does: the primary's keys into src, every part's into parts (one
    projected volume); data as text, binaryData decoded."""
    for d in (src, parts):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    for number, body in enumerate(bodies):
        into = src if number == 0 else parts
        for key, text in (body.get("data") or {}).items():
            (into / key).write_text(text, encoding="utf-8")
        for key, packed in (body.get("binaryData") or {}).items():
            (into / key).write_bytes(base64.b64decode(packed))


class _Loader:
    def __init__(self, tmp_path: Path) -> None:
        self.etc, self.postmap = _postmap_config(tmp_path)
        self.src, self.parts, self.dst = tmp_path / "src", tmp_path / "parts", tmp_path / "dst"
        self.dst.mkdir()

    def run(self, *, parts: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {"PATH": f"{SBIN}:/usr/bin:/bin", "SRC": str(self.src),
               "PARTS": str(parts or self.parts), "DST": str(self.dst), "MAP_TYPE": "lmdb",
               "POSTFIX_CONFIG": str(self.etc), "LANG": "C.UTF-8"}
        return subprocess.run(["sh", str(LOAD_TABLES)], env=env, capture_output=True,
                              text=True, timeout=300, check=False)

    def query(self, table: str, *keys: str) -> list[str | None]:
        """``postmap -q -``: every key in one run (one line out per key found)."""
        result = subprocess.run([self.postmap, "-c", str(self.etc), "-q", "-",
                                 f"lmdb:{self.dst / table}"], input="".join(
                                     k + "\n" for k in keys), capture_output=True, text=True,
                                timeout=60, check=False)
        found = dict(line.split("\t", 1) for line in result.stdout.splitlines())
        return [found.get(k) for k in keys]


def _synthetic(tls_lines: int, transport_lines: int = 0) -> Tables:
    def lines(n: int, value: str, seed: int) -> str:
        return "".join(f"{(i * 2654435761 + seed) % 2**48:012x}.example {value}\n"
                       for i in range(n))

    tls = lines(tls_lines, "encrypt", 1)
    transport = lines(transport_lines, "smtp:[relay.example]", 2) if transport_lines else ""
    revision = hashlib.sha256(f"{tls}\0{transport}".encode()).hexdigest()
    return Tables(revision=revision, tls_policy=f"# revision: {revision}\n{tls}",
                  transport=transport, tls_entries={}, transport_entries={}, owners={})


@pytest.mark.postfix
@pytest.mark.parametrize(("shape", "tls_lines", "transport_lines", "bodies"), [
    ("plain", 1_000, 10, 1),
    ("gzip", 40_000, 10, 1),
    ("split", 250_000, 0, 4),
    ("split, both tables", 150_000, 150_000, 5),
])
def test_load_tables_loads_each_shape_the_operator_writes(
        tmp_path: Path, shape: str, tls_lines: int, transport_lines: int, bodies: int) -> None:
    loader = _Loader(tmp_path)
    tables = _synthetic(tls_lines, transport_lines)
    wanted = configmap_bodies("mail", "relay", tables)
    assert len(wanted) == bodies, shape
    keys = [ln.split(" ", 1) for ln in tables.tls_policy.splitlines()[1:]]
    transport = [ln.split(" ", 1) for ln in tables.transport.splitlines()]
    for layout in ("parts in their own volume", "one directory"):
        _mount(wanted, loader.src, loader.parts)
        if layout == "one directory":
            for f in loader.parts.iterdir():
                f.rename(loader.src / f.name)
        result = loader.run()
        assert result.returncode == 0, result.stderr
        assert f"(revision {tables.revision})" in result.stdout
        sample = [keys[0], keys[len(keys) // 2], keys[-1]]
        assert loader.query("tls_policy", *(k for k, _ in sample)) == [v for _, v in sample]
        if transport:
            assert loader.query("transport", transport[-1][0]) == [transport[-1][1]]
        assert not list(loader.dst.glob(".*")), "temporary files left behind"


def _million() -> Tables:
    """1,000,000 destinations rendered the operator's way: 1,000 policies of 1,000."""
    levels = ["may", "encrypt", "dane", "secure", "verify"]
    policies = []
    for p in range(1_000):
        spec: dict[str, Any] = {"destinations": [f"d{p * 1000 + i}.example"
                                                 for i in range(1_000)],
                                "level": levels[p % len(levels)]}
        if spec["level"] in ("secure", "verify"):
            spec["match"] = ["nexthop", "dot-nexthop"]
        policies.append(load_policy({
            "apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy",
            "metadata": {"name": f"p{p:04d}", "namespace": "mail", "uid": f"uid-{p}",
                         "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": spec}))
    return render(policies, instance=("mail", "relay"))


@pytest.mark.postfix
@pytest.mark.slow
def test_a_million_destinations_split_into_parts_load_with_real_postmap(
        tmp_path: Path) -> None:
    loader = _Loader(tmp_path)
    tables = _million()
    assert len(tables.tls_entries) == 1_000_001
    bodies = configmap_bodies("mail", "relay", tables)
    sizes = [len(json.dumps(b).encode()) for b in bodies]
    assert len(bodies) == 5 and all(s < LIMIT - 64 * 1024 for s in sizes), sizes
    assert reassemble(bodies) == tables.tls_policy

    _mount(bodies, loader.src, loader.parts)
    result = loader.run()
    assert result.returncode == 0, result.stderr
    assert "tls_policy.gz.chunks (4 chunks)" in result.stdout
    keys = [REVISION_KEY, "d0.example", "d123456.example", "d500000.example",
            "d999999.example", "d1000000.example"]
    want = [tables.tls_entries.get(k) for k in keys]
    assert want[-1] is None and all(want[:-1])
    assert loader.query("tls_policy", *keys) == want

    # A pod that starts while the operator is writing a new revision sees the new
    # primary with an old part: the chunks do not match the manifest's sha256, the
    # script fails (the kubelet retries it), and the live table is untouched.
    newer = configmap_bodies("mail", "relay", Tables(
        revision="0" * 64, tls_policy=tables.tls_policy.replace("\nd1.example may\n",
                                                                "\nd1.example encrypt\n"),
        transport="", tls_entries={}, transport_entries={}, owners={}))
    assert newer[2]["binaryData"] != bodies[2]["binaryData"]  # d1.example sorts first
    _mount([newer[0], newer[1], bodies[2], newer[3], newer[4]], loader.src, loader.parts)
    result = loader.run()
    assert result.returncode == 1
    assert "different revisions" in result.stderr
    assert loader.query("tls_policy", REVISION_KEY, "d1.example") == [
        tables.tls_entries[REVISION_KEY], "may"]
    assert not list(loader.dst.glob(".*")), "temporary files left behind"

    # A part not mounted at all (a Deployment listing too few): named in the error.
    _mount(bodies[:-1], loader.src, loader.parts)
    result = loader.run()
    assert result.returncode == 1
    assert "tls_policy.gz.003 (chunk 4 of 4, in ConfigMap relay-mailtls-part-4)" in \
        result.stderr
