"""The workload cluster: a cluster on this machine as kwokctl's binary runtime builds one, etcd,
kube-apiserver, kube-controller-manager, kube-scheduler and kwok, plus the pod sandbox
that runs what the Postfix pods would run.

Pods are made by the real controllers (Deployments, ReplicaSets, StatefulSets), bound
by the real scheduler to kwok's nodes, taken to Running and Ready by kwok once
:class:`~testbed.sandbox.PodSandbox` has started their Postfix, and exec'd into through
the real ``pods/exec``.  Its own control plane, separate from the ``controlplane``
test fixture's: that one runs no controllers on purpose (its tests create pods on nodes
that do not exist and objects with owners that do not exist, which the pod and object
garbage collectors here would delete).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from .controllers import Controllers
from .controlplane import ControlPlane, rss_kib
from .kwok import Kwok
from .lifecycle import StartStop
from .sandbox import STARTED, PodSandbox, write_wrappers


class WorkloadCluster(StartStop):
    """The cluster in ``workdir``; a context manager (or start()/stop())."""

    def __init__(self, workdir: Path, *, nodes: int = 2, binaries: Path | None = None,
                 audit: bool = True) -> None:
        self.workdir = workdir
        self.node_count = nodes
        self.plane = ControlPlane(workdir / "plane", binaries=binaries, audit=audit)
        self.bin_dir = write_wrappers(Path(tempfile.mkdtemp(prefix="mailtls-podexec-")))
        self.kwok = Kwok(self.plane, workdir / "kwok", leases=True, ready_gate=STARTED,
                         path=[self.bin_dir])
        self.controllers = Controllers(self.plane, workdir / "controllers")
        self.sandbox = PodSandbox(self.plane, self.kwok, workdir / "sandbox",
                                  bin_dir=self.bin_dir)
        self.nodes: list[str] = []
        #: Seconds from start() to every node Ready.
        self.start_seconds = 0.0

    def start(self) -> WorkloadCluster:
        began = time.monotonic()
        try:
            self.plane.start()
            self.kwok.start()
            self.controllers.start()
            self.sandbox.start()
            for i in range(self.node_count):
                name = f"kwok-node-{i}"
                self.kwok.add_node(name)
                self.nodes.append(name)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Everything stopped, the sandbox's Postfix instances first."""
        self.sandbox.stop()
        self.controllers.stop()
        self.kwok.stop()
        self.plane.stop()
        shutil.rmtree(self.bin_dir, ignore_errors=True)

    def figures(self) -> dict[str, float]:
        """Start seconds and RSS (MiB) of every process, for docs and the bench."""
        out = {"cluster_start_s": round(self.start_seconds, 2),
               "controlplane_start_s": round(self.plane.start_seconds, 2)}
        for name, proc in (("etcd", self.plane.etcd), ("kube-apiserver", self.plane.apiserver),
                           ("kwok", self.kwok.proc)):
            out[f"{name}_rss_mib"] = round(rss_kib(proc.pid) / 1024, 1) if proc else 0.0
        out.update(self.controllers.figures())
        return out


def main() -> None:
    """``python -m testbed.workloadcluster``: start a cluster, roll the example Postfix out on it
    and print the figures docs/testbed.md quotes."""
    import json
    import statistics
    import sys

    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="mailtls-cluster-") as tmp, \
            WorkloadCluster(Path(tmp)) as cluster:
        figures: dict[str, float] = cluster.figures()
        plane = cluster.plane
        began = time.monotonic()
        plane.kubectl("apply", "--server-side", "-k", str(repo / "manifests/examples/postfix"))
        plane.kubectl("rollout", "status", "-n", "mail", "deploy/relay", "--timeout=120s",
                      timeout=130)
        figures["example_postfix_2_pods_available_s"] = round(time.monotonic() - began, 2)
        pod = plane.kubectl("get", "pods", "-n", "mail", "-o", "name").stdout.split()[0]
        took = []
        for _ in range(20):
            t0 = time.monotonic()
            plane.kubectl("exec", "-n", "mail", pod, "-c", "postfix", "--", "postmap", "-q",
                          "x.example", "lmdb:/var/lib/mailtls/tls_policy", check=False)
            took.append(time.monotonic() - t0)
        figures["kubectl_exec_postmap_median_ms"] = round(statistics.median(took) * 1000, 1)
        figures.update({f"after_{k}": v for k, v in cluster.figures().items()
                        if k.endswith("_rss_mib")})
        json.dump(figures, sys.stdout, indent=2)
        print()


if __name__ == "__main__":
    main()
