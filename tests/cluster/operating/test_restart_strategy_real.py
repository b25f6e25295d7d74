"""The ``restart`` strategy for real (issue 24): ``mailtls run`` annotates the pod template
of the example Postfix workload, the real controller-manager rolls it, the real
scheduler binds the new pods to kwok's nodes, the pod sandbox runs each new pod's init
container (the example's ``load-tables.sh``, reading the ConfigMap as the kubelet's
volume would show it) and Postfix, and kwok makes the pod Ready.

The workload is the example's own (``manifests/examples/postfix``, rendered by
``kubectl kustomize``) with ``mailtls.io/strategy: restart``: a Deployment, and the
same pod template as a StatefulSet with a partition, whose pods the real StatefulSet
controller replaces from the highest ordinal down, one at a time, each once the one
before is Ready, never below the partition.  The live tables are read in each new pod
through the real ``pods/exec`` with ``postmap -q``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml

from mailtls_operator.render import REVISION_KEY
from testbed.workloadcluster import WorkloadCluster

from .audit import AuditLog
from .conftest import FAST, REPO, admin_service_account
from .helpers import Cluster, OperatorProcess, policy, until

pytestmark = [pytest.mark.cluster, pytest.mark.postfix, pytest.mark.slow]

TABLE = "lmdb:/var/lib/mailtls/tls_policy"
REVISION_ANNOTATION = "mailtls.io/revision"


@pytest.fixture(scope="session")
def workload_crds(workload_cluster: WorkloadCluster) -> WorkloadCluster:
    workload_cluster.plane.apply_crds(sorted((REPO / "crds").glob("*.yaml")))
    return workload_cluster


@pytest.fixture
def cluster(workload_crds: WorkloadCluster, workload_namespace: str) -> Iterator[Cluster]:
    """This module's ``cluster`` is the workload cluster's (it overrides the conftest's)."""
    with workload_crds.plane.api_client() as client:
        yield Cluster(client, workload_namespace)


@pytest.fixture
def operator(workload_crds: WorkloadCluster, cluster: Cluster, tmp_path: Path,
             request: pytest.FixtureRequest) -> Iterator[OperatorProcess]:
    """``mailtls run`` for the test's namespace, as a ServiceAccount of its own."""
    identity = admin_service_account(workload_crds.plane, cluster, "mailtls-operator",
                                     tmp_path / "operator.kubeconfig")
    proc = OperatorProcess(identity.kubeconfig, tmp_path / "operator.log",
                           ["-n", cluster.ns, *FAST])
    yield proc
    code = proc.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(f"--- {proc.log} (exit {code}) ---\n{proc.tail(120)}")
        print(f"--- sandbox log ---\n{_tail(workload_crds.sandbox.workdir / 'sandbox.log')}")
    assert "Traceback" not in proc.running_log, proc.tail(80)


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) \
        if path.exists() else ""


def example_objects(kc: WorkloadCluster, namespace: str, *, kind: str = "Deployment",
                    replicas: int = 2, partition: int = 0) -> list[dict[str, Any]]:
    """The example Postfix instance in ``namespace`` with the restart strategy; with
    ``kind="StatefulSet"`` its pod template under a StatefulSet with ``partition``."""
    rendered = kc.plane.kubectl("kustomize", str(REPO / "manifests/examples/postfix")).stdout
    objs = [o for o in yaml.safe_load_all(rendered) if o and o["kind"] != "Namespace"]
    for obj in objs:
        obj["metadata"]["namespace"] = namespace
    workload = next(o for o in objs if o["kind"] == "Deployment")
    workload["spec"]["replicas"] = replicas
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    annotations["mailtls.io/strategy"] = "restart"
    if kind == "StatefulSet":
        workload["kind"] = "StatefulSet"
        workload["spec"]["serviceName"] = "relay"
        workload["spec"]["updateStrategy"] = {"type": "RollingUpdate",
                                              "rollingUpdate": {"partition": partition}}
    return objs


def apply(kc: WorkloadCluster, objs: list[dict[str, Any]]) -> None:
    kc.plane.kubectl("apply", "--server-side", "--field-manager=test", "-f", "-",
                     input=yaml.safe_dump_all(objs))


def rollout_status(kc: WorkloadCluster, ns: str, what: str) -> None:
    kc.plane.kubectl("rollout", "status", "-n", ns, what, "--timeout=120s", timeout=130)


def live_revision(kc: WorkloadCluster, ns: str, pod: str) -> str:
    """The revision sentinel's value in the pod's live table, through ``pods/exec``."""
    done = kc.plane.kubectl("exec", "-n", ns, pod, "-c", "postfix", "--", "postmap", "-q",
                            REVISION_KEY, TABLE, check=False)
    return done.stdout.strip()


def sentinel(revision: str) -> str:
    return f"secure match=rev-{revision[:16]}"


@dataclass(frozen=True)
class PodEvent:
    """One watch event of a pod: who, which incarnation, and what it said."""

    type: str
    name: str
    uid: str
    ready: bool
    revision: str


class PodEvents:
    """Every pod event of a namespace in the order the API server sent them."""

    def __init__(self, client: kubernetes.client.ApiClient, namespace: str) -> None:
        self.core: Any = kubernetes.client.CoreV1Api(client)
        self.ns = namespace
        self.events: list[PodEvent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PodEvents:
        listed = self.core.list_namespaced_pod(self.ns)
        self._rv = listed.metadata.resource_version
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            watcher: Any = watch.Watch()  # type: ignore[no-untyped-call]
            for event in watcher.stream(self.core.list_namespaced_pod, self.ns,
                                        resource_version=self._rv, timeout_seconds=1):
                pod = event["object"]
                self._rv = pod.metadata.resource_version
                conditions = (pod.status.conditions if pod.status else None) or []
                self.events.append(PodEvent(
                    event["type"], pod.metadata.name, pod.metadata.uid,
                    any(c.type == "Ready" and c.status == "True" for c in conditions),
                    (pod.metadata.annotations or {}).get(REVISION_ANNOTATION, "")))

    def first(self, name: str, *, ready: bool, after: int = 0,
              exclude: set[str] | None = None) -> int:
        """Index of the first event of a new incarnation of ``name`` (Ready ones only
        with ``ready``); -1 if none."""
        return next((i for i, e in enumerate(self.events) if i >= after
                     and e.name == name and e.uid not in (exclude or set())
                     and (e.ready or not ready) and e.type != "DELETED"), -1)


def ready_condition(cluster: Cluster, name: str) -> dict[str, Any]:
    return cluster.condition(name, "Ready") or {}


def test_restart_rolls_the_deployment_and_each_new_pod_loads_the_revision(
        workload_crds: WorkloadCluster, cluster: Cluster, operator: OperatorProcess) -> None:
    kc, ns = workload_crds, cluster.ns
    apply(kc, example_objects(kc, ns))
    rollout_status(kc, ns, "deploy/relay")
    apps: Any = kubernetes.client.AppsV1Api(cluster.client)
    first_rs = {rs.metadata.name for rs in apps.list_namespaced_replica_set(ns).items}
    assert kc.plane.audit_log is not None
    audit = AuditLog(kc.plane.audit_log, cluster.client)
    audit.mark()
    operator.start().wait_healthy()

    for generation, level in ((1, "encrypt"), (2, "may")):
        cluster.apply(policy("partner", ns, destinations=["a.example"], level=level))
        ready = until(lambda g=generation: (c := ready_condition(cluster, "partner"))  # type: ignore[misc]
                      and c.get("status") == "True" and c.get("observedGeneration") == g
                      and c, 90, what=f"Ready=True of generation {generation}")
        assert ready["reason"] == "RolledOut" and "2/2 pods verified revision" in ready["message"]
        cm = cluster.configmap()
        assert cm is not None
        revision = cm["metadata"]["annotations"]["mailtls.io/revision"]
        deploy = apps.read_namespaced_deployment("relay", ns)
        assert deploy.spec.template.metadata.annotations[REVISION_ANNOTATION] == revision
        rollout_status(kc, ns, "deploy/relay")
        # a new ReplicaSet with the revision in its template; the old ones scaled to 0
        sets = apps.list_namespaced_replica_set(ns).items
        current = [rs for rs in sets
                   if rs.spec.template.metadata.annotations.get(REVISION_ANNOTATION)
                   == revision]
        assert len(current) == 1 and current[0].metadata.name not in first_rs
        assert current[0].status.ready_replicas == 2
        assert all(rs.spec.replicas == 0 for rs in sets if rs is not current[0])
        pods = [p for p in cluster.core.list_namespaced_pod(ns).items
                if not p.metadata.deletion_timestamp]
        assert len(pods) == 2
        for pod in pods:
            assert pod.metadata.owner_references[0].name == current[0].metadata.name
            assert pod.metadata.annotations[REVISION_ANNOTATION] == revision
            # the init container loaded the ConfigMap's table into this pod's Postfix
            assert live_revision(kc, ns, pod.metadata.name) == sentinel(revision)
            want = "encrypt" if level == "encrypt" else "may"
            got = kc.plane.kubectl("exec", "-n", ns, pod.metadata.name, "-c", "postfix",
                                   "--", "postmap", "-q", "a.example", TABLE).stdout.strip()
            assert got == want
    audit.barrier()
    operator_user = f"system:serviceaccount:{ns}:mailtls-operator"
    assert audit.count(None, "pods", subresource="exec", user=operator_user) == 0
    patches = audit.select("patch", "deployments", user=operator_user)
    assert len(patches) == 2, patches  # one template annotation per revision


def test_restart_rolls_a_statefulset_from_the_top_ordinal_down_and_honours_its_partition(
        workload_crds: WorkloadCluster, cluster: Cluster, operator: OperatorProcess) -> None:
    kc, ns = workload_crds, cluster.ns
    apply(kc, example_objects(kc, ns, kind="StatefulSet", replicas=3, partition=1))
    rollout_status(kc, ns, "statefulset/relay")
    before = {p.metadata.name: p.metadata.uid
              for p in cluster.core.list_namespaced_pod(ns).items}
    assert sorted(before) == ["relay-0", "relay-1", "relay-2"]
    old = set(before.values())
    with PodEvents(cluster.client, ns) as events:
        operator.start().wait_healthy()
        cluster.apply(policy("partner", ns, destinations=["a.example"], level="encrypt"))
        pending = until(lambda: (c := ready_condition(cluster, "partner"))
                        and "2/3 pods on revision" in c.get("message", "") and c, 90,
                        what="two of three pods updated (partition 1)")
        assert pending["status"] != "True"
        cm = cluster.configmap()
        assert cm is not None
        revision = cm["metadata"]["annotations"]["mailtls.io/revision"]
        apps: Any = kubernetes.client.AppsV1Api(cluster.client)
        until(lambda: apps.read_namespaced_stateful_set("relay", ns).status.updated_replicas
              == 2, 30, what="the StatefulSet counts two updated replicas")
        sts = apps.read_namespaced_stateful_set("relay", ns)
        assert sts.status.current_revision != sts.status.update_revision
        pods = {p.metadata.name: p for p in cluster.core.list_namespaced_pod(ns).items}
        assert pods["relay-0"].metadata.uid == before["relay-0"], "below the partition"
        assert REVISION_ANNOTATION not in (pods["relay-0"].metadata.annotations or {})
        assert live_revision(kc, ns, "relay-0") == ""  # still the table it started with

        # ordered: relay-2 replaced and Ready before relay-1 is replaced
        new2_ready = events.first("relay-2", ready=True, exclude=old)
        new1_created = events.first("relay-1", ready=False, exclude=old)
        assert -1 < new2_ready < new1_created, events.events

        kc.plane.kubectl("patch", "-n", ns, "statefulset/relay", "--type=merge", "-p",
                         json.dumps({"spec": {"updateStrategy": {"rollingUpdate": {
                             "partition": 0}}}}))
        ready = until(lambda: (c := ready_condition(cluster, "partner"))
                      and c.get("status") == "True" and c, 90, what="Ready=True")
        assert ready["reason"] == "RolledOut" and "3/3 pods verified revision" in ready["message"]
        rollout_status(kc, ns, "statefulset/relay")
        new1_ready = events.first("relay-1", ready=True, exclude=old)
        new0_created = events.first("relay-0", ready=False, exclude=old)
        assert -1 < new1_ready < new0_created, events.events
    for name in ("relay-0", "relay-1", "relay-2"):
        pod = cluster.core.read_namespaced_pod(name, ns)
        assert pod.metadata.uid not in old
        assert pod.metadata.annotations[REVISION_ANNOTATION] == revision
        assert live_revision(kc, ns, name) == sentinel(revision)
