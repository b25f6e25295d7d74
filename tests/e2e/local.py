"""``make e2e`` where there is no docker or kind: the same end-to-end run on this machine.

The cluster is real but for the kubelet (``testbed/workloadcluster.py``): etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok with two nodes, all compiled here from
the pinned modules, and the pod sandbox that runs each Postfix pod's init container and
Postfix locally in the pod's own mounts.  On it:

1. the chart, rendered by Helm's own Go code (helm-python-sdk, as the contract tests
   render it) with its default values, applied with kubectl;
2. the operator as a local process (``mailtls run`` with the chart's arguments, its
   health and metrics ports moved to free loopback ports) playing one of the chart's
   two operator pods: the pod's name and namespace in its environment as the Downward
   API gives them, and a token of the chart's ServiceAccount bound to that pod from the
   TokenRequest API -- so it runs under the chart's RBAC and takes the Lease as that pod;
3. ``tests/e2e/run.sh local``: the chart's rollout and leader, the example Postfix
   Deployment (its pods made by the real controllers, bound by the real scheduler),
   the example policies, Ready, and every pod's live tables read with ``postmap -q``
   through ``kubectl exec`` -- the same checks as on kind.

Prints the wall time and what a kubelet would add that is not covered here.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from testbed.layout import free_port
from testbed.sandbox import sandbox_unavailable
from testbed.workloadcluster import WorkloadCluster
from tests.contract import kit

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "tests" / "e2e" / "run.sh"
NAMESPACE = kit.NAMESPACE
OPERATOR_SELECTOR = "app.kubernetes.io/name=mailtls-operator," \
                    "app.kubernetes.io/instance=mailtls-operator"
TIMEOUT = 180.0
NOT_COVERED = (
    "the images: nothing runs mailtls-operator:0.1.0 or the Postfix image; the operator "
    "is a local process and each Postfix pod is a local Postfix 3.7 (Debian bookworm's, "
    "as in the image) started in the pod's mounts",
    "probes: kwok reports every container ready; no liveness or readiness probe runs",
    "volume refresh: a ConfigMap volume is written once, when the pod starts; the "
    "kubelet's later refresh is not simulated",
    "the securityContext beyond the user (capabilities, read-only root, seccomp), "
    "resource limits, the network (Services, NetworkPolicy), image pulls, logs",
)


def log(text: str) -> None:
    print(f"\n== {text}", flush=True)


def apply_chart(kc: WorkloadCluster) -> dict[str, Any]:
    """Render the chart (default values) and apply it; returns its Deployment."""
    objs = kit.chart_objects()
    kc.plane.request("POST", "/api/v1/namespaces", {
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    kc.plane.kubectl("apply", "--server-side", "--field-manager=mailtls-e2e", "-f", "-",
                     input=yaml.safe_dump_all(objs), timeout=120)
    crds = [f"crd/{o['metadata']['name']}" for o in objs
            if o["kind"] == "CustomResourceDefinition"]
    kc.plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", *crds,
                     timeout=90)
    for obj in objs:
        print(f"applied {obj['kind']} {obj['metadata'].get('namespace', '')}/"
              f"{obj['metadata']['name']}".replace(" /", " "))
    return next(o for o in objs if o["kind"] == "Deployment")


def operator_pod(kc: WorkloadCluster) -> str:
    """The name of one of the chart's operator pods once the Deployment is available."""
    kc.plane.kubectl("rollout", "status", "-n", NAMESPACE, "deploy/mailtls-operator",
                     f"--timeout={TIMEOUT:.0f}s", timeout=TIMEOUT + 10)
    names = kc.plane.kubectl("get", "pods", "-n", NAMESPACE, "-l", OPERATOR_SELECTOR,
                             "-o", "jsonpath={.items[*].metadata.name}").stdout.split()
    return sorted(names)[0]


def operator_argv(deployment: dict[str, Any], env: dict[str, str]) -> list[str]:
    """The chart's container arguments, ``$(VAR)`` expanded as the kubelet does, the
    health and metrics listeners moved to free loopback ports."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a)
            for a in container["args"]]
    moved = {"--health": f"127.0.0.1:{free_port()}", "--metrics": f"127.0.0.1:{free_port()}"}
    args = [f"{a.split('=', 1)[0]}={moved[a.split('=', 1)[0]]}"
            if a.split("=", 1)[0] in moved else a for a in args]
    return [str(Path(sys.executable).with_name("mailtls")), *args]


def start_operator(kc: WorkloadCluster, deployment: dict[str, Any], pod: str,
                   workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """``mailtls run`` as ``pod``: its Downward API environment and a token of the
    chart's ServiceAccount bound to it."""
    sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    token = kc.plane.service_account_token(NAMESPACE, sa, pod=pod)
    kubeconfig = kc.plane.kubeconfig_for_token(token, workdir / "operator.kubeconfig")
    pod_env = {"POD_NAME": pod, "POD_NAMESPACE": NAMESPACE}
    argv = operator_argv(deployment, pod_env)
    env = {**os.environ, **pod_env, "KUBECONFIG": str(kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    logfile = workdir / "operator.log"
    print("operator:", " ".join(argv[1:]))
    with logfile.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    health = next(a.split("=", 1)[1] for a in argv if a.startswith("--health="))
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the operator exited with {proc.returncode}:\n"
                               f"{logfile.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://{health}/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return proc, logfile
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the operator is not healthy after 60 s; see {logfile}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def main() -> int:
    began = time.monotonic()
    if reason := sandbox_unavailable():
        print(f"e2e cannot run here: {reason}", file=sys.stderr)
        return 1
    keep = os.environ.get("E2E_WORKDIR")  # logs kept there (the operator's, every process's)
    with contextlib.nullcontext(keep) if keep else \
            tempfile.TemporaryDirectory(prefix="mailtls-e2e-") as tmp:
        workdir = Path(tmp)
        log("starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok")
        with WorkloadCluster(workdir / "cluster", nodes=2) as kc:
            version = kc.plane.version()["gitVersion"]
            print(f"API server {kc.plane.url} ({version}); nodes {', '.join(kc.nodes)}; "
                  f"up in {kc.start_seconds:.1f} s")
            log(f"the chart, rendered by the Helm SDK, applied to {NAMESPACE}")
            deployment = apply_chart(kc)
            pod = operator_pod(kc)
            log(f"the operator as a local process playing pod {NAMESPACE}/{pod}")
            proc, logfile = start_operator(kc, deployment, pod, workdir)
            assert kc.plane.binaries is not None
            env = {**os.environ, "KUBECONFIG": str(kc.plane.kubeconfig),
                   "KUBE_CONTEXT": "testbed",
                   "PATH": f"{kc.plane.binaries}:{os.environ.get('PATH', '')}"}
            try:
                done = subprocess.run(["bash", str(RUN), "local"], env=env,
                                      cwd=REPO, check=False, timeout=1200)
            finally:
                stop(proc)
            if done.returncode != 0 or kc.sandbox.failures:
                print(f"--- {logfile} (last lines) ---")
                print("\n".join(logfile.read_text(errors="replace").splitlines()[-80:]))
                for uid, why in kc.sandbox.failures.items():
                    print(f"sandbox: pod {uid}: {why}")
                return done.returncode or 1
    log("not covered here (what a kubelet would add)")
    for line in NOT_COVERED:
        print(f"- {line}")
    print(f"\ne2e (real control plane + controllers + kwok) wall time: "
          f"{time.monotonic() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
