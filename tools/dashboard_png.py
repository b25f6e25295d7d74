"""Draw the dashboard's key series, as a real Prometheus recorded them, into one PNG.

The dashboard test (tests/cluster/operating/test_dashboard_prometheus.py) saves the range queries
of its run as JSON and calls :func:`plot`; ``make dashboard-png`` runs that test with
``MAILTLS_DASHBOARD_PNG=docs/dashboard.png`` so docs/dashboard.md shows what the panels
show. By hand: ``python tools/dashboard_png.py series.json out.png``.

The JSON: ``{"panels": [{"title": ..., "unit": ..., "series": [{"label": ...,
"t": [seconds since the start, ...], "v": [value, ...]}]}]}``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only

import matplotlib.pyplot as plt  # after use(): the backend is chosen first


def plot(data: dict[str, Any], out: Path, columns: int = 3) -> None:
    """One small chart per panel in a grid, step lines as Grafana draws gauges."""
    panels = data["panels"]
    end = max((max(s["t"]) for p in panels for s in p["series"] if s["t"]), default=1.0)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.6 * rows),
                             squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for s in panel["series"]:
            ax.step(s["t"], s["v"], where="post", label=s["label"], linewidth=1.4)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlim(0, end)
        ax.set_ylim(bottom=0)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("seconds into the run", fontsize=7)
        if panel.get("unit") not in (None, "", "short"):
            ax.set_ylabel(panel["unit"], fontsize=7)
        if panel["series"]:
            ax.legend(fontsize=6, loc="upper left", frameon=False)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(data.get("title", "mailtls-operator"), fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python tools/dashboard_png.py SERIES.json OUT.png", file=sys.stderr)
        return 2
    plot(json.loads(Path(argv[0]).read_text()), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
