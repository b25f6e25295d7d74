"""Policy fix -> stuck message at the sink, through the whole operator (issue 8's figure).

Two real Postfix pods (kwok pods on the real kube-apiserver, exec through ``pods/exec``),
a sink without STARTTLS and ``mailtls run``, set up as ``make demo`` does: ten times,
enforce ``encrypt`` (mail is deferred for TLS), then relax the policy to ``may`` with
kubectl and time until the deferred message arrives; printed next to Postfix's own retry
delay on the same instance.  Run: ``.venv/bin/python -m bench.fix_to_delivery``.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from demo.__main__ import NS, Demo
from testbed.kwokcluster import KwokCluster
from testbed.wait import until


def main(rounds: int = 10) -> int:
    base = Path(tempfile.mkdtemp(prefix="mailtls-fix-"))
    base.chmod(0o755)
    took: list[float] = []
    try:
        with ExitStack() as stack:
            cluster = KwokCluster(base / "cluster")
            stack.callback(cluster.stop)
            cluster.start()
            cluster.namespace(NS)
            demo = Demo(stack, base, cluster)
            demo.start_sinks()
            demo.start_pods()
            demo.start_operator()
            inst = demo.pods["relay-0"]
            for i in range(rounds):
                demo.apply(demo.policy("plain", destinations=[demo.plain.nexthop],
                                       level="encrypt"))
                demo.settled(["plain"])
                qid = inst.submit([f"u{i}@plain.example.test"])
                inst.wait_for_delivery(qid, status="deferred")
                until(lambda: demo.deferred("plain"), 30, "status.deferred of plain")
                start = time.monotonic()
                demo.apply(demo.policy("plain", destinations=[demo.plain.nexthop], level="may"))
                demo.plain.wait_for(i + 1, 30)
                took.append(time.monotonic() - start)
            retry = inst.postconf("minimal_backoff_time", "queue_run_delay")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"policy fix -> stuck message at the sink, {rounds} rounds, 2 pods: "
          f"p50 {statistics.median(took):.3f} s, min {min(took):.3f} s, max {max(took):.3f} s")
    print(f"Postfix's own retry on that instance: minimal_backoff_time="
          f"{retry['minimal_backoff_time']}, queue_run_delay={retry['queue_run_delay']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
