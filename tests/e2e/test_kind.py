"""End-to-end on a kind cluster: `tests/e2e/run.sh e2e` (build, load, deploy, apply the
example policies, check every Postfix pod's live table with postmap -q).

Skipped, with the reason, where there is no container engine, no kind or no cluster;
`make e2e` runs the same script directly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

RUN = Path(__file__).with_name("run.sh")
CLUSTER = os.environ.get("KIND_CLUSTER", "mailtls-e2e")


def _why_not() -> str | None:
    for tool in ("docker", "kind", "kubectl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return "docker info timed out"
    if info.returncode != 0:
        return "no container engine (docker info failed)"
    clusters = subprocess.run(["kind", "get", "clusters"], capture_output=True, text=True,
                              timeout=20, check=False).stdout.split()
    if CLUSTER not in clusters:
        return f"no kind cluster {CLUSTER!r} (make kind-up)"
    return None


@pytest.mark.e2e
@pytest.mark.slow
def test_e2e_on_kind() -> None:
    reason = _why_not()
    if reason:
        pytest.skip(f"e2e skipped: {reason}")
    result = subprocess.run(["bash", str(RUN), "e2e"], capture_output=True, text=True,
                            timeout=1800, check=False)
    assert "e2e skipped" not in result.stdout, result.stdout
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "e2e passed" in result.stdout
