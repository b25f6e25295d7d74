"""Every table the renderer can write is accepted by the real ``postmap`` and answers exactly
the rendered value for every key (lmdb and hash; the examples also cdb and texthash), IDN
keys included (DESIGN.md §2), on Postfix 3.7 and 3.10."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailtls_operator.policy import PolicyInvalid, load_policy
from mailtls_operator.postfix import compiles
from mailtls_operator.render import Tables, render
from mailtls_operator.sources import read_policies
from testbed.postfixroot import VERSIONS, PostfixBuild, build_for
from tests.unit.strategies import specs

pytestmark = pytest.mark.postfix
EXAMPLES = Path(__file__).parents[2] / "manifests" / "examples" / "policies"


@dataclass(frozen=True)
class Postmap:
    """``postmap`` of one Postfix version with its own main.cf in ``config_dir``."""

    build: PostfixBuild
    config_dir: Path

    def run(self, args: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        argv = self.build.command(["postmap", "-c", str(self.config_dir), *args],
                                  self.config_dir)
        return subprocess.run(argv, input=stdin, capture_output=True,
                              timeout=60, check=False)


@pytest.fixture(scope="module", params=VERSIONS)
def config_dir(request: pytest.FixtureRequest) -> Iterator[Postmap]:
    build = build_for(request.param)
    reason = build.unavailable()
    if reason is not None:
        pytest.skip(f"Postfix {request.param} cannot run here: {reason}")
    path = Path(tempfile.mkdtemp(prefix="mailtls-postmap-"))
    path.chmod(0o755)
    (path / "main.cf").write_text("compatibility_level = 3.6\nmyhostname = localhost\n")
    old = 1_000_000_000  # Postfix re-reads a main.cf younger than a second: age it
    os.utime(path / "main.cf", (old, old))
    yield Postmap(build, path)
    shutil.rmtree(path, ignore_errors=True)
    build.forget(path)


def compile_and_query(config_dir: Postmap, text: str, entries: Mapping[str, str],
                      map_type: str) -> dict[str, str]:
    with tempfile.TemporaryDirectory(dir=config_dir.config_dir) as tmp:
        table = Path(tmp) / "tls_policy"
        table.write_text(text, encoding="utf-8")
        if compiles(map_type):
            made = config_dir.run([f"{map_type}:{table}"])
            assert made.returncode == 0, made.stderr
        out = config_dir.run(["-q", "-", f"{map_type}:{table}"],
                             "".join(f"{k}\n" for k in entries).encode())
    found = {}
    for line in out.stdout.decode("utf-8").splitlines():
        key, _, value = line.partition("\t")
        found[key] = value
    return found


def check(config_dir: Postmap, tables: Tables,
          map_types: tuple[str, ...] = ("lmdb", "hash")) -> None:
    for map_type in map_types:
        assert compile_and_query(config_dir, tables.tls_policy, tables.tls_entries,
                                 map_type) == tables.tls_entries, map_type


def test_the_examples_render_to_a_table_postmap_answers_exactly(config_dir: Postmap) -> None:
    policies = [load_policy(s.obj) for s in read_policies([str(EXAMPLES)])]
    tables = render(policies)
    assert "bücher.example" in tables.tls_entries
    check(config_dir, tables, ("lmdb", "cdb", "hash", "texthash"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(specs(hostile_ok=False), min_size=1, max_size=4))
def test_any_accepted_input_renders_to_a_table_postmap_answers_exactly(
        config_dir: Postmap, spec_list: list[dict[str, Any]]) -> None:
    accepted = []
    for i, spec in enumerate(spec_list):
        obj = {"metadata": {"name": f"p{i}", "namespace": "mail"}, "spec": spec}
        try:
            accepted.append(load_policy(obj))
        except PolicyInvalid:
            continue
    check(config_dir, render(accepted))
