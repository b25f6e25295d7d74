"""The real control plane's own cost: start-to-ready, restart, RSS, binary sizes.

``python -m bench controlplane`` (or ``python -m bench.controlplane``).  Starts etcd +
kube-apiserver from the cached binaries (``make controlplane``) a few times in fresh
directories: the time from launching etcd to a ready apiserver with the ``default``
namespace, the RSS of both processes right after ready and after the project's CRDs
are applied, and one apiserver restart.  The build itself is measured by
``tools/build.sh`` (docs/testbed.md has the cold figures).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Result, Summary, table
from testbed.controlplane import REPO, ControlPlane, ControlPlaneError, binaries_dir, rss_kib

NAME = "controlplane"
STARTS = 3


def _mib(kib: int) -> float:
    return kib / 1024


def run(starts: int = STARTS) -> Result:
    result = Result(NAME, "Real control plane: etcd + kube-apiserver start, restart, RSS",
                    config={"starts": starts})
    try:
        binaries = binaries_dir()
    except ControlPlaneError as exc:
        result.skipped = str(exc)
        print(f"skipped: {exc}")
        return result
    sizes = {p.name: p.stat().st_size for p in sorted(binaries.iterdir())
             if p.is_file() and not p.name.startswith(".") and p.suffix != ".log"}
    rows = []
    for n in range(starts):
        with tempfile.TemporaryDirectory(prefix="mailtls-cp-bench-") as tmp, \
                ControlPlane(Path(tmp), binaries=binaries) as plane:
            assert plane.etcd is not None and plane.apiserver is not None
            row = {"start_s": plane.start_seconds,
                   "etcd_rss_mib": _mib(rss_kib(plane.etcd.pid)),
                   "apiserver_rss_mib": _mib(rss_kib(plane.apiserver.pid))}
            if n == 0:
                row["version"] = plane.version()["gitVersion"]
                plane.apply_crds(sorted((REPO / "crds").glob("*.yaml")))
                row["apiserver_rss_crds_mib"] = _mib(rss_kib(plane.apiserver.pid))
                t0 = time.monotonic()
                plane.restart_apiserver()
                row["restart_s"] = time.monotonic() - t0
            rows.append(row)
    result.rows = [{"binary_bytes": sizes}, *rows]
    print(table(("start", "start→ready s", "etcd RSS MiB", "apiserver RSS MiB"),
                [(f"#{i + 1}", r["start_s"], r["etcd_rss_mib"], r["apiserver_rss_mib"])
                 for i, r in enumerate(rows)]))
    first = rows[0]
    print(f"server {first['version']}; apiserver RSS with the CRDs "
          f"{first['apiserver_rss_crds_mib']:.0f} MiB; restart→ready {first['restart_s']:.1f} s")
    print(table(("binary", "MiB"), [(k, v / 2**20) for k, v in sizes.items()]))
    median = statistics.median(r["start_s"] for r in rows)
    result.summary = [
        Summary(NAME, "start→ready (etcd + kube-apiserver), median", median, "s"),
        Summary(NAME, "kube-apiserver RSS after ready", first["apiserver_rss_mib"], "MiB"),
        Summary(NAME, "etcd RSS after ready", first["etcd_rss_mib"], "MiB"),
    ]
    result.notes.append(f"binaries from {binaries}")
    return result


if __name__ == "__main__":
    sys.exit(0 if not run().skipped else 1)
