"""Per-pod apply time of the exec rollout on a real local Postfix (lmdb).

Measures ``rollout.apply_to_pod`` through ``LocalPodRunner`` (the argv a pod
would run: write via stdin, postmap, mv, postfix reload, postmap -q verify)
for tables of 1,000 and 100,000 entries, each applied over a live table of
the same size.  Prints the median per step of several runs.  Needs root and
Debian's postfix + postfix-lmdb; not a timed test.

    .venv/bin/python bench/rollout_apply.py [--sizes 1000 100000] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import statistics
import tempfile
from pathlib import Path

from mailtls_operator.podrunner import PodRef
from mailtls_operator.render import REVISION_KEY, revision_value
from mailtls_operator.rollout import PodTarget, Step, TableSet, apply_to_pod
from testbed import InstanceSettings, LocalInstance, LocalPodRunner

STEPS = [Step.WRITE, Step.POSTMAP, Step.SWAP, Step.RELOAD, Step.VERIFY]


def table(size: int, generation: int) -> TableSet:
    """``size`` entries whose values change with ``generation`` (so every apply is real)."""
    levels = ("encrypt", "secure match=nexthop:dot-nexthop", "may")
    entries = {f"d{n:06d}.example": levels[(n + generation) % 3] for n in range(size)}
    body = "".join(f"{k} {v}\n" for k, v in entries.items())
    revision = hashlib.sha256(f"{generation}\0{body}".encode()).hexdigest()
    text = f"# revision: {revision}\n{REVISION_KEY} {revision_value(revision)}\n{body}"
    return TableSet(revision, text, None, {REVISION_KEY: revision_value(revision), **entries})


async def measure(size: int, runs: int, base: Path) -> dict[str, float]:
    inst = LocalInstance(base / f"bench-{size}", InstanceSettings(name=f"bench{size}"))
    inst.create()
    inst.start()
    try:
        pod = PodRef("bench", inst.settings.name)
        runner = LocalPodRunner({pod: inst})
        target = PodTarget(pod, map_path=str(inst.map_path), map_type="lmdb")
        current = table(size, 0)
        first = await apply_to_pod(runner, target, current, timeout=120)
        assert first.ok, first.describe()
        samples: dict[str, list[float]] = {s.value: [] for s in STEPS}
        samples["total"] = []
        for gen in range(1, runs + 1):
            wanted = table(size, gen)
            out = await apply_to_pod(
                runner, PodTarget(pod, map_path=str(inst.map_path), map_type="lmdb",
                                  applied_revision=current.revision), wanted, timeout=120)
            assert out.ok, out.describe()
            for s in STEPS:
                samples[s.value].append(out.timings.get(s.value, 0.0))
            samples["total"].append(out.duration)
            current = wanted
        return {k: statistics.median(v) for k, v in samples.items()}
    finally:
        inst.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mailtls-bench-"))
    base.chmod(0o755)  # Postfix daemons (user postfix) must reach the instance
    try:
        print(f"{'entries':>8} {'text':>9} " + " ".join(f"{s.value:>8}" for s in STEPS)
              + f" {'total':>8}   (median of {args.runs}, ms)")
        for size in args.sizes:
            res = asyncio.run(measure(size, args.runs, base))
            kib = len(table(size, 0).tls_policy.encode()) / 1024
            print(f"{size:>8} {kib:>7.0f}Ki "
                  + " ".join(f"{res[s.value] * 1000:>8.1f}" for s in STEPS)
                  + f" {res['total'] * 1000:>8.1f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
