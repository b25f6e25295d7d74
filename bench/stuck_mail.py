"""Stuck mail released: time from ``postqueue -i`` to arrival at the destination.

DESIGN.md §10: when a rollout changes a key's line, the mail deferred for that
key is scheduled at once instead of waiting for Postfix's next retry.  Each
run, on one real local Postfix instance (lmdb, loopback sink without
STARTTLS):

1. roll out ``encrypt`` for the sink's next-hop, submit a message, wait until
   Postfix logs it deferred ("TLS is required, but was not offered");
2. roll out ``may`` (``rollout.apply_to_pod``: write, postmap, swap, reload,
   verify);
3. read the queue (``mailqueue.read_queue``), attribute the deferral to its
   key (``deferred_by_key``) and ``release`` the ids of the changed key;
4. measure release -> the sink has the message, and rollout done -> arrival.

Prints min / p50 / max over the runs and the instance's own retry timers
(``queue_run_delay``, ``minimal_backoff_time``, ``maximal_backoff_time``),
which is what the message would have waited without the release.  Needs root
and Debian's postfix + postfix-lmdb; not a timed test.

    .venv/bin/python bench/stuck_mail.py [--runs 10]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mailtls_operator import mailqueue as mq
from mailtls_operator.facts import read_instance_config
from mailtls_operator.podrunner import PodRef
from mailtls_operator.policy import Policy, load_policy
from mailtls_operator.render import render
from mailtls_operator.rollout import PodTarget, TableSet, apply_to_pod
from testbed import InstanceSettings, LocalInstance, LocalPodRunner, plain_sink


def _policy(level: str, key: str) -> Policy:
    return load_policy({"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy",
                        "metadata": {"name": "partner", "namespace": "mail",
                                     "creationTimestamp": "2026-01-01T00:00:00Z"},
                        "spec": {"destinations": [key], "level": level}})


def _tables(level: str, key: str) -> TableSet:
    return TableSet.of(render([_policy(level, key)], instance=("mail", "relay")))


async def measure(runs: int, base: Path) -> tuple[list[float], list[float], list[float],
                                                  dict[str, str]]:
    sink = plain_sink("stuck").start()
    routes = {"stuck.test": f"smtp:{sink.nexthop}"}
    inst = LocalInstance(base / "relay-0", InstanceSettings(name="relay-0", routes=routes))
    inst.create()
    inst.start()
    pod = PodRef("mail", "relay-0")
    runner = LocalPodRunner({pod: inst})
    release_to_arrival: list[float] = []
    rollout_to_arrival: list[float] = []
    release_cmd: list[float] = []
    try:
        config = await read_instance_config(runner, pod)
        applied: str | None = None
        for run in range(runs):
            strict, relaxed = _tables("encrypt", sink.nexthop), _tables("may", sink.nexthop)
            target = PodTarget(pod, map_path=str(inst.map_path), map_type="lmdb",
                               applied_revision=applied, configmap_dir=str(inst.configmap_dir))
            assert (await apply_to_pod(runner, target, strict, timeout=30)).ok
            applied = strict.revision
            qid = inst.submit(f"run{run}@stuck.test")
            assert inst.wait_for_delivery(qid, status="deferred", timeout=30).status == "deferred"

            target = PodTarget(pod, map_path=str(inst.map_path), map_type="lmdb",
                               applied_revision=applied, configmap_dir=str(inst.configmap_dir))
            out = await apply_to_pod(runner, target, relaxed, timeout=30)
            assert out.ok, out
            applied = relaxed.revision
            rolled_out = time.perf_counter()

            deferred = mq.deferred_by_key(await mq.read_queue(runner, pod),
                                          strict.tls_entries, config, routes)
            ids = mq.releasable_ids(deferred, [sink.nexthop])
            assert ids == [qid], (ids, qid)
            before = len(sink.messages)
            t0 = time.perf_counter()
            released = await mq.release(runner, pod, ids)
            t1 = time.perf_counter()
            assert all(r.ok for r in released), released
            sink.wait_for(before + 1, timeout=30)
            t2 = time.perf_counter()
            release_cmd.append(t1 - t0)
            release_to_arrival.append(t2 - t0)
            rollout_to_arrival.append(t2 - rolled_out)
        timers = inst.run(["postconf", "queue_run_delay", "minimal_backoff_time",
                           "maximal_backoff_time"]).stdout.decode()
        return release_to_arrival, rollout_to_arrival, release_cmd, {
            k.strip(): v.strip() for k, _, v in (ln.partition("=") for ln in timers.splitlines())}
    finally:
        inst.stop()
        sink.stop()


def _row(name: str, samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    return (f"  {name:34} min {ms[0]:7.1f}  p50 {statistics.median(ms):7.1f}  "
            f"max {ms[-1]:7.1f} ms  (n={len(ms)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="mailtls-bench-stuck-"))
    base.chmod(0o755)
    try:
        rel, roll, cmd, timers = asyncio.run(measure(args.runs, base))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("stuck mail released (encrypt -> may, plain sink, loopback):")
    print(_row("release -> arrival", rel))
    print(_row("rollout verified -> arrival", roll))
    print(_row("postqueue -i (command itself)", cmd))
    print("  without the release Postfix retries at its next queue run:")
    for name, value in timers.items():
        print(f"    {name} = {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
