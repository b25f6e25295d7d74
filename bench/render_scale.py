"""Render scale: validation and render of 1k..1M destinations against the real ``postmap``.

For each size a fresh process builds the MailTLSPolicy objects, validates them
(``load_policy``: CRD schema, CEL twins, the model), renders the table of one
instance (``render``), and compiles exactly that table with the real ``postmap``
(lmdb): the physical floor any rollout pays per pod.  Time is measured without
tracing; peak memory is the rise of the process' peak RSS (``VmHWM``, reset
through ``/proc/self/clear_refs`` before each phase), so measuring memory costs
nothing and both figures come from the same run.

Separately, DESIGN.md §2: validating 10,000 policies cold (fresh process, empty
cache, the operator's own path ``World.upsert_policy``) must take under 1 s.

Run alone: ``python -m bench.render_scale`` (or ``python bench/render_scale.py``).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    ROOT,
    Result,
    Summary,
    cpu_seconds,
    hwm_mib,
    reset_hwm,
    rss_mib,
    table,
)

NAME = "render_scale"
SIZES = (1_000, 10_000, 100_000, 1_000_000)
PER_POLICY = 100
LEVELS = ["may", "encrypt", "dane", "secure", "verify"]
VALIDATION_POLICIES = 10_000
VALIDATION_TARGET_S = 1.0
CHILD_TIMEOUT = 300


def make_objects(n: int, per_policy: int = PER_POLICY) -> list[dict[str, Any]]:
    """n destinations spread over n/per_policy policies, with some cross-policy conflicts."""
    objs = []
    for p in range(max(1, n // per_policy)):
        level = LEVELS[p % len(LEVELS)]
        first = p * per_policy - (p % 7 == 3)  # every 7th policy shares a key with the previous
        spec: dict[str, Any] = {"destinations": [f"d{max(0, first + i)}.example"
                                                 for i in range(per_policy)], "level": level}
        if level in ("secure", "verify"):
            spec["match"] = ["nexthop", "dot-nexthop"]
        objs.append({"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy",
                     "metadata": {"name": f"p{p}", "namespace": "mail", "uid": f"uid-{p}",
                                  "generation": 1,
                                  "creationTimestamp": "2026-01-01T00:00:00Z"},
                     "spec": spec})
    return objs


def realistic_objects(count: int) -> list[dict[str, Any]]:
    """``count`` policies shaped like real ones: 1-4 destinations each (domains, .domains,
    [host]:port, IDN), every level, optional ciphers/protocols/exclude/servername."""
    objs = []
    for p in range(count):
        level = ("may", "encrypt", "dane", "secure", "verify", "fingerprint", "none",
                 "dane-only")[p % 8]
        dests = [f"partner{p}.example"]
        if p % 2:
            dests.append(f".partner{p}.example")
        if p % 5 == 0:
            dests.append(f"[mx{p}.partner.example]:25")
        if p % 20 == 7:
            dests.append(f"bücher{p}.example")
        spec: dict[str, Any] = {"destinations": dests, "level": level}
        if level in ("secure", "verify"):
            spec["match"] = ["nexthop", "dot-nexthop"]
            if p % 3 == 0:
                spec["tafile"] = ["/etc/postfix/tls/ca.pem"]
        if level == "fingerprint":
            spec["match"] = ["3D:95:34:51:24:66:33:B9:D2:40:99:C0:C1:17:0B:D1"]
        if level != "none":
            if p % 4 == 1:
                spec["protocols"] = ">=TLSv1.2"
            if p % 6 == 2:
                spec["ciphers"] = "high"
                spec["exclude"] = ["3DES", "aNULL"]
            if p % 9 == 4:
                spec["servername"] = "hostname"
        objs.append({"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy",
                     "metadata": {"name": f"p{p:05d}", "namespace": "mail",
                                  "uid": f"uid-{p}", "generation": 1,
                                  "creationTimestamp": "2026-01-01T00:00:00Z"},
                     "spec": spec})
    return objs


# ----------------------------------------------------------------------------- postmap


def postmap_seconds(text: str, map_type: str = "lmdb", runs: int = 2) -> float | None:
    """Best wall time of ``postmap TYPE:FILE`` compiling ``text`` (None without Postfix)."""
    postmap = "/usr/sbin/postmap"
    if not Path(postmap).exists():
        return None
    with tempfile.TemporaryDirectory(prefix="mailtls-bench-") as tmp:
        main_cf = Path(tmp) / "main.cf"
        main_cf.write_text("compatibility_level = 3.6\nmyhostname = localhost\n")
        # Postfix re-reads a config file younger than 1 s every 300 ms (dict_load_file):
        # without backdating, a 1k-entry postmap measures 1.8 s of waiting.
        past = time.time() - 10
        os.utime(main_cf, (past, past))
        table_path = Path(tmp) / "tls_policy"
        table_path.write_text(text, encoding="utf-8")
        best = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run([postmap, "-c", tmp, f"{map_type}:{table_path}"], check=True,
                           capture_output=True, env={**os.environ, "LANG": "C.UTF-8"})
            best = min(best, time.perf_counter() - start)
        return best


# ------------------------------------------------------------------------------ children


def measure_size(n: int) -> dict[str, Any]:
    """In a fresh process: validate, render and postmap n destinations."""
    from mailtls_operator.policy import load_policy
    from mailtls_operator.render import render

    objs = make_objects(n)
    gc.collect()
    traced = reset_hwm()
    base = rss_mib()
    cpu0, start = cpu_seconds(), time.perf_counter()
    policies = [load_policy(o) for o in objs]
    validate_s = time.perf_counter() - start
    validate_cpu = cpu_seconds() - cpu0
    validate_peak = hwm_mib() - base

    gc.collect()
    reset_hwm()
    base = rss_mib()
    start = time.perf_counter()
    tables = render(policies, instance=("mail", "relay"))
    first_render = time.perf_counter() - start
    render_peak = hwm_mib() - base
    repeats = 5 if n <= 10_000 else 3 if n <= 100_000 else 1
    best = first_render
    for _ in range(repeats - 1):
        start = time.perf_counter()
        again = render(policies, instance=("mail", "relay"))
        best = min(best, time.perf_counter() - start)
        del again
    entries = len(tables.tls_entries) - 1
    text = tables.tls_policy
    pm = postmap_seconds(text)
    return {
        "destinations": n, "policies": len(objs), "entries": entries,
        "table_bytes": len(text.encode("utf-8")),
        "validate_s": validate_s, "validate_cpu_s": validate_cpu,
        "validate_peak_mib": validate_peak,
        "render_s": best, "render_first_s": first_render, "render_peak_mib": render_peak,
        "postmap_lmdb_s": pm,
        "render_vs_postmap": best / pm if pm else None,
        "validate_vs_postmap": validate_s / pm if pm else None,
        "memory_probe": "VmHWM rise" if traced else "VmRSS rise (clear_refs refused)",
    }


def measure_validation(count: int) -> dict[str, Any]:
    """In a fresh process: the operator's validation path over ``count`` policies."""
    from mailtls_operator.policy import load_policy
    from mailtls_operator.world import World

    objs = realistic_objects(count)
    clock = _fixed_clock()
    cpu0, start = time.process_time(), time.perf_counter()
    world = World(clock=clock)  # cold: fresh process, no cache, schema compiled on first use
    for obj in objs:
        world.upsert_policy(obj)
    cold = time.perf_counter() - start
    cold_cpu = time.process_time() - cpu0
    invalid = sum(1 for r in world.records() if r.errors)

    start = time.perf_counter()
    world2 = World(clock=clock)  # warm process, empty cache
    for obj in objs:
        world2.upsert_policy(obj)
    warm = time.perf_counter() - start

    start = time.perf_counter()
    for obj in objs:  # same generation again (e.g. status-write echoes, resync): cache hits
        world2.upsert_policy(obj)
    cached = time.perf_counter() - start

    start = time.perf_counter()
    for obj in objs:
        load_policy(obj, now=clock())
    model_only = time.perf_counter() - start
    return {"policies": count, "destinations": sum(len(o["spec"]["destinations"])
                                                   for o in objs),
            "invalid": invalid, "cold_s": cold, "cold_cpu_s": cold_cpu,
            "warm_process_no_cache_s": warm,
            "cache_hits_s": cached, "load_policy_only_s": model_only,
            "validations": world.validations}


def _fixed_clock() -> Any:
    from datetime import UTC, datetime

    now = datetime(2026, 1, 2, tzinfo=UTC)
    return lambda: now


def _child(args: list[str]) -> dict[str, Any]:
    """Run this module in a fresh interpreter; return its JSON answer."""
    proc = subprocess.run([sys.executable, "-m", "bench.render_scale", "--child", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=CHILD_TIMEOUT,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"render_scale child {args} failed: {proc.stderr[-2000:]}")
    answer: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return answer


# -------------------------------------------------------------------------------- main


def run(sizes: tuple[int, ...] = SIZES) -> Result:
    result = Result(NAME, "Render scale: validate + render vs real postmap (lmdb)",
                    config={"sizes": list(sizes), "destinations_per_policy": PER_POLICY,
                            "validation_policies": VALIDATION_POLICIES})
    rows = [_child(["size", str(n)]) for n in sizes]
    result.rows.extend(rows)
    print(table(
        ("destinations", "policies", "validate s", "val. peak MiB", "render s",
         "render peak MiB", "table MiB", "postmap s", "render/postmap", "validate/postmap"),
        [(r["destinations"], r["policies"], r["validate_s"], r["validate_peak_mib"],
          r["render_s"], r["render_peak_mib"], r["table_bytes"] / 2**20, r["postmap_lmdb_s"],
          _ratio(r["render_vs_postmap"]), _ratio(r["validate_vs_postmap"])) for r in rows]))

    val = _child(["validate", str(VALIDATION_POLICIES)])
    result.rows.append({"validation": val})
    print()
    print(table(("validation of 10k policies", "seconds", "vs 1 s target"),
                [("cold: fresh process, empty cache (World.upsert_policy)", val["cold_s"],
                  _ratio(val["cold_s"] / VALIDATION_TARGET_S)),
                 ("warm process, empty cache", val["warm_process_no_cache_s"],
                  _ratio(val["warm_process_no_cache_s"] / VALIDATION_TARGET_S)),
                 ("load_policy alone (no cache key)", val["load_policy_only_s"],
                  _ratio(val["load_policy_only_s"] / VALIDATION_TARGET_S)),
                 ("same generation again: cache hits", val["cache_hits_s"],
                  _ratio(val["cache_hits_s"] / VALIDATION_TARGET_S))]))
    print(f"({val['destinations']:,} destinations, {val['invalid']} refused, "
          f"{val['validations']:,} validations; cold run CPU time {val['cold_cpu_s']:.2f} s)")

    for r in rows:
        n = r["destinations"]
        target, ok = ("", None)
        if n == 100_000 and r["postmap_lmdb_s"]:
            target, ok = "<= 2x postmap", r["render_s"] <= 2 * r["postmap_lmdb_s"]
        result.summary.append(Summary(NAME, f"render {_size(n)} destinations", r["render_s"],
                                      "s", r["postmap_lmdb_s"], "postmap", target, ok))
    for r in rows:
        if r["destinations"] >= 100_000:
            result.summary.append(Summary(
                NAME, f"validate {_size(r['destinations'])} destinations", r["validate_s"], "s",
                r["postmap_lmdb_s"], "postmap"))
    big = rows[-1]
    table_mib = big["table_bytes"] / 2**20
    result.summary.append(Summary(
        NAME, f"peak RSS rise, render {_size(big['destinations'])}", big["render_peak_mib"],
        "MiB", table_mib, "table size", "<= 3x table", big["render_peak_mib"] <= 3 * table_mib))
    result.summary.append(Summary(
        NAME, f"peak RSS rise, validate {_size(big['destinations'])}",
        big["validate_peak_mib"], "MiB", big["table_bytes"] / 2**20, "table size"))
    result.summary.append(Summary(
        NAME, "validate 10k policies, cold (no cache)", val["cold_s"], "s",
        VALIDATION_TARGET_S, "target", "< 1 s", val["cold_s"] < VALIDATION_TARGET_S))
    result.notes.append("memory: rise of the process' peak RSS during the phase "
                        "(VmHWM reset via /proc/self/clear_refs), fresh process per size")
    result.notes.append("validation of the size rows runs in a fresh process: its first "
                        "policy also pays the one-time schema compile")
    return result


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}x"


def _size(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--child"]:
        kind, n = args[1], int(args[2])
        answer = measure_size(n) if kind == "size" else measure_validation(n)
        print(json.dumps(answer))
        return
    from bench.__main__ import run_one

    run_one(run)


if __name__ == "__main__":
    main()
