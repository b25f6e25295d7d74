"""Shared by the benchmarks: result tables, JSON output, statistics, process probes."""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Summary:
    """One line of the final summary: a figure, its baseline from the same run, the ratio."""

    bench: str
    metric: str
    value: float | int | None
    unit: str = ""
    baseline: float | int | None = None
    baseline_label: str = ""
    target: str = ""
    ok: bool | None = None
    previous: float | int | None = None
    """The same row's value in the previous run (the committed ``bench/results``)."""
    previous_emulated: bool = False
    """That previous value was measured against the API emulation, this one against the
    real kube-apiserver: the difference includes the move."""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return float(self.value) / float(self.baseline)

    @property
    def vs_previous(self) -> float | None:
        if self.value is None or not self.previous:
            return None
        return float(self.value) / float(self.previous)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "vs_previous": self.vs_previous}


@dataclass
class Result:
    """What one benchmark produced."""

    name: str
    title: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: list[Summary] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str | None = None


RUN: dict[str, Result] = {}
"""Results of the benchmarks already run in this process (one may use another's figure)."""


def fmt(value: Any, digits: int = 3) -> str:
    """A number as people read it in a table."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == 0:
            return "0"
        mag = abs(value)
        if mag >= 1000:
            return f"{value:,.0f}"
        if mag >= 100:
            return f"{value:.1f}"
        if mag >= 1:
            return f"{value:.{max(digits - 1, 1)}f}"
        return f"{value:.{digits}g}" if mag < 0.001 else f"{value:.{digits + 1}f}".rstrip("0")
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table, columns right-aligned except the first."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r]
                                           for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:],
                                                                      strict=True)]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_rows(items: Iterable[Summary]) -> list[list[Any]]:
    out = []
    for s in items:
        unit = f" {s.unit}" if s.unit else ""
        value = f"{fmt(s.value)}{unit}" if s.value is not None else "-"
        base = (f"{fmt(s.baseline)}{unit} {s.baseline_label}".strip()
                if s.baseline is not None else s.baseline_label or "-")
        ratio = f"{s.ratio:.3g}x" if s.ratio is not None else "-"
        prev = f"{fmt(s.previous)}{unit}{EMULATED_MARK if s.previous_emulated else ''}" \
            if s.previous is not None else "-"
        vs = f"{s.vs_previous:.3g}x" if s.vs_previous is not None else "-"
        verdict = "" if s.ok is None else ("ok" if s.ok else "MISSED")
        out.append([s.bench, s.metric, value, base, ratio, prev, vs,
                    f"{s.target} {verdict}".strip() or "-"])
    return out


SUMMARY_HEADERS = ("benchmark", "metric", "value", "baseline (same run)", "ratio", "previous",
                   "vs prev", "target")
EMULATED_MARK = " (emu)"
EMULATED_NOTE = ("(emu): the previous run measured this against the API emulation "
                 "(testbed/apiserver.py); this run against the real kube-apiserver with kwok "
                 "pods, so the change includes the move (the benchmark's notes say how)")


def print_summary(items: Sequence[Summary], title: str | None = None) -> None:
    if title:
        print(f"\n{title}")
    print(table(SUMMARY_HEADERS, summary_rows(items)))
    if any(s.previous_emulated for s in items):
        print(EMULATED_NOTE)


# ------------------------------------------------------------------ the previous run


def _metric_key(metric: str) -> str:
    """A row's name without the counts some names carry, e.g. "re-rolls verified (10)"."""
    return re.sub(r"\(\d+\)", "(n)", metric)


def _previous_doc(name: str) -> dict[str, Any] | None:
    """``bench/results/<name>.json`` as last committed (the previous full run; a partial run
    meanwhile only changed the work tree), else as in the work tree, else None."""
    rel = f"bench/results/{name}.json"
    with _suppress():
        done = subprocess.run(["git", "-C", str(ROOT), "show", f"HEAD:{rel}"],
                              capture_output=True, text=True, timeout=10, check=False)
        if done.returncode == 0:
            return dict(json.loads(done.stdout))
    with _suppress():
        return dict(json.loads((ROOT / rel).read_text()))
    return None


PREVIOUS: dict[str, dict[str, Any] | None] = {}


def previous(name: str) -> dict[str, Any] | None:
    """The previous run's document of benchmark ``name`` (read once, before this run
    writes its own)."""
    if name not in PREVIOUS:
        PREVIOUS[name] = _previous_doc(name)
    return PREVIOUS[name]


def attach_previous(result: Result) -> None:
    """Fill each summary row's ``previous`` from the previous run's same row."""
    doc = previous(result.name)
    if not doc:
        return
    rows = {_metric_key(r["metric"]): r for r in doc.get("summary") or []}
    emulated = "api_server" in result.config and "api_server" not in (doc.get("config") or {})
    for s in result.summary:
        old = rows.get(_metric_key(s.metric))
        if old is not None and old.get("value") is not None:
            s.previous = old["value"]
            s.previous_emulated = emulated


def machine() -> dict[str, Any]:
    """Where the figures come from."""
    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "cpus": os.cpu_count()}
    with _suppress():
        info["cpu_model"] = next(ln.split(":", 1)[1].strip() for ln in
                                 Path("/proc/cpuinfo").read_text().splitlines()
                                 if ln.startswith("model name"))
    postconf = shutil.which("postconf", path="/usr/sbin:/usr/bin")
    if postconf:
        with _suppress():
            out = subprocess.run([postconf, "-d", "mail_version"], capture_output=True,
                                 text=True, timeout=10, check=False).stdout
            info["postfix"] = out.split("=", 1)[1].strip()
    return info


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def write_json(result: Result) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{result.name}.json"
    doc = {"name": result.name, "title": result.title, "skipped": result.skipped,
           "seconds": round(result.seconds, 2), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "machine": machine(), "config": result.config, "rows": result.rows,
           "summary": [s.as_dict() for s in result.summary], "notes": result.notes}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sample."""
    data = sorted(values)
    if not data:
        return math.nan
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def stats(values: Sequence[float]) -> dict[str, float]:
    """p50, p95, min, max, mean of a sample (seconds in, seconds out)."""
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "min": min(values), "max": max(values), "mean": statistics.fmean(values)}


# ---------------------------------------------------------------------- process probes


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, ... of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Vm"):
            name, _, rest = line.partition(":")
            out[name] = int(rest.split()[0])
    return out


def rss_mib(pid: int | str = "self") -> float:
    return proc_status(pid)["VmRSS"] / 1024


def hwm_mib(pid: int | str = "self") -> float:
    return proc_status(pid)["VmHWM"] / 1024


def reset_hwm(pid: int | str = "self") -> bool:
    """Reset the peak-RSS mark (``echo 5 > /proc/PID/clear_refs``); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def postfix_available() -> str | None:
    """None if real Postfix instances can run here, else why not."""
    from testbed import postfix_unavailable

    return postfix_unavailable()


def run_with_postfix(name: str, title: str,
                     scenario: Callable[[Result], Coroutine[Any, Any, None]]) -> Result:
    """Run an asyncio scenario that needs real Postfix, or record why it was skipped."""
    result = Result(name, title)
    why = postfix_available()
    if why:
        result.skipped = why
        print(f"skipped: {why}")
        return result
    asyncio.run(scenario(result))
    return result
