"""The agent runs in every mail pod: its process must not pull in the operator's heavy
libraries (Kopf, the official client, aiohttp), which would break its memory budget
(``make bench``: agent RSS < 40 MiB)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
from mailtls_operator.cli import build_parser
args = build_parser().parse_args(["agent", "--instance", "relay", "--namespace", "mail",
                                  "--pod", "relay-0", "--api-url", "http://127.0.0.1:1"])
from mailtls_operator.agent import api, cli, converge, loop, runner
print(" ".join(sorted(m for m in ("kopf", "kubernetes", "aiohttp", "prometheus_client")
                      if m in sys.modules)))
"""


def test_the_agent_imports_no_operator_libraries() -> None:
    res = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""
