"""Image sizes and build times (``images/build.sh``, podman).

Sizes: each image against its own base (the same run's figure), so the table shows what
the project adds; the operator image has a target of at most 250 MB. Build times: a
build without the layer cache against the rebuild that follows it with the cache warm
(nothing changed: what a developer's second ``make images`` costs; on podman the
operator image is always built without the cache, see images/build.sh, so its two
figures are alike). Where the bases
are the local stand-ins (no registry reachable), the stand-ins are rebuilt first and
timed too: that is what a fresh machine's first ``make images`` costs on top.

Skipped where podman cannot run (the reason is printed). The bench builds under its own
tags and removes them afterwards, so the images of ``make images`` stay as they were.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, Result, Summary, table

BUILD = ROOT / "images" / "build.sh"
CONF = ROOT / "images" / "containers.conf"
OPERATOR = "localhost/mailtls-operator:bench"
POSTFIX = "localhost/mailtls-postfix:bench"
TARGET_MB = 250.0


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONF)),
            "CONTAINER_ENGINE": "podman", "OPERATOR_TAG": OPERATOR, "POSTFIX_TAG": POSTFIX,
            **extra}


def _build(command: str, **extra: str) -> tuple[dict[str, float], str]:
    """Run images/build.sh COMMAND; its step timings and its stderr (the bases it chose)."""
    with tempfile.NamedTemporaryFile("r", suffix=".timings") as timings:
        proc = subprocess.run(["bash", str(BUILD), command], capture_output=True, text=True,
                              timeout=1800, check=False,
                              env=_env(IMAGES_TIMINGS=timings.name, **extra))
        if proc.returncode != 0:
            raise RuntimeError(f"images/build.sh {command} failed:\n{proc.stderr[-4000:]}")
        steps = {name: float(sec) for name, sec in
                 (line.split() for line in Path(timings.name).read_text().splitlines())}
    return steps, proc.stderr


def _size_mb(image: str) -> float:
    out = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", image],
                         capture_output=True, text=True, timeout=60, env=_env(), check=True)
    return int(out.stdout.strip()) / 1e6


def _unavailable() -> str | None:
    proc = subprocess.run(["bash", str(BUILD), "engine"], capture_output=True, text=True,
                          timeout=120, env=_env(), check=False)
    if proc.returncode != 0 or proc.stdout.strip() != "podman":
        return (proc.stdout or proc.stderr).strip() or "podman is not available"
    return None


def run() -> Result:
    result = Result("images", "Image sizes and build times (podman, images/build.sh)")
    reason = _unavailable()
    if reason is not None:
        result.skipped = reason
        return result
    try:
        _, chosen = _build("bases")
        line = chosen.split("bases: ", 1)[1].splitlines()[0]
        bases = dict(part.split("=", 1) for part in line.split())
        standin = "mailtls-standin" in chosen
        rows: list[list[object]] = []
        if standin:
            steps, _ = _build("standins")
            rows += [["stand-in debian base (mmdebstrap)", steps["standin-debian"], "-"],
                     ["stand-in python base (mmdebstrap)", steps["standin-python"], "-"]]
        t0 = time.perf_counter()
        cold, _ = _build("images", NO_CACHE="1")
        cold_total = time.perf_counter() - t0
        warm, _ = _build("images")
        rows += [["operator image build", cold["operator"], warm["operator"]],
                 ["postfix image build", cold["postfix"], warm["postfix"]]]
        sizes = {"operator": _size_mb(OPERATOR), "postfix": _size_mb(POSTFIX),
                 "python base": _size_mb(bases["PYTHON_IMAGE"]),
                 "debian base": _size_mb(bases["DEBIAN_IMAGE"])}
    finally:
        subprocess.run(["podman", "rmi", "--force", OPERATOR, POSTFIX], capture_output=True,
                       timeout=120, env=_env(), check=False)
    print(table(["build", "seconds, no cache", "seconds, cache warm"], rows))
    print()
    print(table(["image", "MB"], [[k, v] for k, v in sizes.items()]))
    result.rows = ([{"build": r[0], "cold_s": r[1], "warm_s": r[2]} for r in rows]
                   + [{"image": k, "mb": round(v, 1)} for k, v in sizes.items()])
    result.config = {"bases": bases, "standin": standin, "cold_total_s": round(cold_total, 1)}
    result.summary = [
        Summary("images", "operator image size", round(sizes["operator"], 1), "MB",
                round(sizes["python base"], 1), "python base", f"<= {TARGET_MB:.0f} MB",
                sizes["operator"] <= TARGET_MB),
        Summary("images", "postfix image size", round(sizes["postfix"], 1), "MB",
                round(sizes["debian base"], 1), "debian base"),
        Summary("images", "operator build, no cache", round(cold["operator"], 1), "s",
                round(warm["operator"], 1), "cache warm"),
        Summary("images", "postfix build, no cache", round(cold["postfix"], 1), "s",
                round(warm["postfix"], 1), "cache warm"),
    ]
    if standin:
        result.notes.append(f"bases are local stand-ins ({bases}); stand-in builds: "
                            + ", ".join(f"{r[0]} {r[1]:.0f} s" for r in rows[:2]))
    return result
