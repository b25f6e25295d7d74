"""``python -m bench [NAME ...]``: run the benchmarks, print each table and one summary.

Every benchmark writes ``bench/results/<name>.json``; the summary of a full run also
goes to ``bench/results/summary.json`` (of a partial run: ``summary-partial.json``).
Exit status 1 if a benchmark failed to run (a missed target is reported, not an error).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable

from bench.common import (
    RESULTS,
    RUN,
    Result,
    Summary,
    attach_previous,
    machine,
    previous,
    print_summary,
    write_json,
)

Runner = Callable[[], Result]


def _benchmarks() -> dict[str, Callable[[], Runner]]:
    """name -> loader of its ``run`` (imported lazily, so ``--help`` stays fast)."""

    def load(module: str) -> Callable[[], Runner]:
        def get() -> Runner:
            mod = __import__(f"bench.{module}", fromlist=["run"])
            run: Runner = mod.run
            return run
        return get

    return {
        "render_scale": load("render_scale"),
        "burst_coalescing": load("burst"),
        "configmap_latency": load("latency"),
        "enforce_latency": load("enforce"),
        "operator_footprint": load("footprint"),
        "reload_under_load": load("reload_load"),
        "images": load("images"),
        "discovery": load("discovery"),
        "agent_rollout": load("agent_rollout"),
        "controlplane": load("controlplane"),
        "tlsrpt_outcomes": load("tlsrpt_outcomes"),
    }


def run_one(run: Runner) -> Result:
    """Run one benchmark: its table, its JSON file, its part of the summary."""
    start = time.perf_counter()
    result = run()
    result.seconds = time.perf_counter() - start
    attach_previous(result)
    RUN[result.name] = result
    path = write_json(result)
    for note in result.notes:
        print(f"  note: {note}")
    if result.summary:
        print_summary(result.summary)
    print(f"-> {path.relative_to(RESULTS.parents[1])} ({result.seconds:.1f} s)")
    return result


def _terminated(signum: int, _frame: object) -> None:
    """SIGTERM ends the run as Ctrl-C does: through the ``finally`` blocks that stop the
    cluster, the operator processes and Postfix."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    try:
        return _main(argv)
    finally:
        harness = sys.modules.get("bench.harness")  # only if a benchmark started the cluster
        if harness is not None:
            harness.close_cluster()


def _main(argv: list[str] | None = None) -> int:
    benchmarks = _benchmarks()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", choices=[[], *benchmarks], metavar="NAME",
                        help=f"benchmarks to run (default: all): {', '.join(benchmarks)}")
    args = parser.parse_args(argv)
    names = args.names or list(benchmarks)
    for name in names:  # the previous run's figures, before this run writes its own
        previous(name)
    started = time.perf_counter()
    summary: list[Summary] = []
    failed: list[str] = []
    timings: dict[str, float] = {}
    for name in names:
        print(f"\n=== {name} " + "=" * max(0, 70 - len(name)), flush=True)
        t0 = time.perf_counter()
        try:
            result = run_one(benchmarks[name]())
        except Exception:
            traceback.print_exc()
            failed.append(name)
            summary.append(Summary(name, "FAILED (see traceback above)", None))
        else:
            if result.skipped:
                summary.append(Summary(name, f"skipped: {result.skipped}", None))
            summary.extend(result.summary)
        timings[name] = time.perf_counter() - t0
        leftovers = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        if leftovers:
            print(f"WARNING: {name} left threads running: {leftovers}")
            failed.append(f"{name} (threads left: {', '.join(leftovers)})")
        sys.stdout.flush()
    wall = time.perf_counter() - started
    print("\n" + "=" * 78)
    print_summary(summary, f"SUMMARY (wall {wall:.0f} s on {machine().get('cpus')} CPUs)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    # The summary of a full run only: running a few benchmarks keeps the last full summary.
    summary_file = RESULTS / ("summary-partial.json" if args.names else "summary.json")
    summary_file.write_text(json.dumps(
        {"wall_seconds": round(wall, 1), "machine": machine(),
         "seconds": {k: round(v, 1) for k, v in timings.items()}, "failed": failed,
         "summary": [s.as_dict() for s in summary]}, indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
