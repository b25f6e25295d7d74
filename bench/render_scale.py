"""Render scale: time and peak memory of validate+render for N destinations, against the real
``postmap`` compiling the same table (the physical floor).  Prints a table; returns rows."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from mailtls_operator.policy import load_policy
from mailtls_operator.render import render

LEVELS = ["may", "encrypt", "dane", "secure", "verify"]


def make_objects(n: int, per_policy: int = 100) -> list[dict[str, Any]]:
    """n destinations spread over n/per_policy policies, with some cross-policy conflicts."""
    objs = []
    for p in range(max(1, n // per_policy)):
        level = LEVELS[p % len(LEVELS)]
        spec: dict[str, Any] = {"destinations": [f"d{p * per_policy + i}.example"
                                                 for i in range(per_policy)], "level": level}
        if level in ("secure", "verify"):
            spec["match"] = ["nexthop", "dot-nexthop"]
        objs.append({"metadata": {"name": f"p{p}", "namespace": "mail",
                                  "creationTimestamp": "2026-01-01T00:00:00Z"}, "spec": spec})
    return objs


def postmap_seconds(text: str, map_type: str = "lmdb") -> float | None:
    if not Path("/usr/sbin/postmap").exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "main.cf").write_text("compatibility_level = 3.6\nmyhostname = localhost\n")
        table = Path(tmp) / "tls_policy"
        table.write_text(text)
        start = time.perf_counter()
        subprocess.run(["/usr/sbin/postmap", "-c", tmp, f"{map_type}:{table}"], check=True,
                       env={**os.environ})
        return time.perf_counter() - start


def measure(n: int) -> dict[str, Any]:
    objs = make_objects(n)
    tracemalloc.start()
    start = time.perf_counter()
    policies = [load_policy(o) for o in objs]
    validated = time.perf_counter()
    tables = render(policies, instance=("mail", "relay"))
    rendered = time.perf_counter()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # timings above include tracemalloc overhead; repeat render without it for the figure
    start2 = time.perf_counter()
    render(policies, instance=("mail", "relay"))
    render_only = time.perf_counter() - start2
    pm = postmap_seconds(tables.tls_policy)
    return {"destinations": n, "policies": len(objs),
            "validate_s": round(validated - start, 4), "render_s": round(render_only, 4),
            "peak_mib": round(peak / 2**20, 1), "table_bytes": len(tables.tls_policy),
            "postmap_lmdb_s": round(pm, 4) if pm is not None else None,
            "render_vs_postmap": round(render_only / pm, 2) if pm else None,
            "_traced_total_s": round(rendered - start, 4)}


def main(sizes: tuple[int, ...] = (1_000, 10_000, 100_000, 1_000_000)) -> list[dict[str, Any]]:
    rows = [measure(n) for n in sizes]
    print(f"{'destinations':>12} {'validate s':>10} {'render s':>9} {'peak MiB':>9} "
          f"{'postmap s':>9} {'render/postmap':>14}")
    for r in rows:
        print(f"{r['destinations']:>12,} {r['validate_s']:>10} {r['render_s']:>9} "
              f"{r['peak_mib']:>9} {r['postmap_lmdb_s']!s:>9} {r['render_vs_postmap']!s:>14}")
    return rows


if __name__ == "__main__":
    main()
