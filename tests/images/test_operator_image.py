"""The operator image under the chart's own securityContext and volumes: read-only root,
uid/gid 65532, every capability dropped, no privilege escalation, an emptyDir at /tmp.
``mailtls --version`` works, and the chart's own args (``run --all-namespaces
--leader-elect ...``), with the chart's ServiceAccount token mounted as the kubelet
would and only the chart's RBAC, take the Lease, converge a policy into its ConfigMap
through the real kube-apiserver, serve /metrics, and exit 0 on SIGTERM (``podman stop``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from mailtls_operator import __version__
from tests.cluster.operating.helpers import policy, until
from tests.cluster.rbac_setup import Install
from tests.images.harness import operator_pod
from tests.images.operator import OperatorContainer
from tests.images.pods import OPERATOR_IMAGE, ROOT, Volumes, container_args, podman

pytestmark = pytest.mark.images
PACKAGE = ROOT / "operator" / "mailtls_operator"


@pytest.fixture
def operator(install: Install, tmp_path: Path) -> Iterator[OperatorContainer]:
    op = OperatorContainer(tmp_path, install)
    try:
        yield op
    finally:
        op.remove()


def test_version_under_the_charts_security_context(images: None, tmp_path: Path) -> None:
    spec, main = operator_pod()
    volumes = Volumes(tmp_path, spec["volumes"])
    volumes.materialise()
    args = container_args(spec, main, volumes,
                          {"metadata.name": "mailtls-operator-0", "metadata.namespace": "mailtls"})
    assert {"--read-only", "--cap-drop=ALL", "no-new-privileges"} <= set(args)
    assert args[args.index("--user") + 1] == "65532:65532"
    result = podman("run", "--rm", *args, OPERATOR_IMAGE, "--version")
    assert result.stdout.decode().strip() == f"mailtls {__version__}"


_DIGEST = ("import hashlib, pathlib, sys; root = pathlib.Path(sys.argv[1]); "
           "print(hashlib.sha256(b''.join(p.relative_to(root).as_posix().encode() + b'\\0' "
           "+ p.read_bytes() for p in sorted(root.rglob('*.py')))).hexdigest())")


def test_image_carries_this_checkouts_code(images: None) -> None:
    """The image under test is built from the source under test (a stale layer cache
    once gave an image with the previous code: see images/build.sh)."""
    here = subprocess.run([sys.executable, "-c", _DIGEST, str(PACKAGE)], capture_output=True,
                          text=True, check=True, timeout=60).stdout
    inside = podman("run", "--rm", "--entrypoint", "python", OPERATOR_IMAGE, "-c",
                    "import pathlib, sys, mailtls_operator as m; "
                    f"sys.argv[1:] = [str(pathlib.Path(m.__file__).parent)]; exec({_DIGEST!r})")
    assert inside.stdout.decode() == here


def test_image_runs_as_nonroot_without_pip(images: None) -> None:
    config = podman("image", "inspect", "--format", "{{.Config.User}} {{.Config.Entrypoint}}",
                    OPERATOR_IMAGE).stdout.decode().strip()
    assert config == "65532:65532 [mailtls]"
    result = podman("run", "--rm", "--entrypoint", "python", OPERATOR_IMAGE, "-c",
                    "import importlib.util as u; print(u.find_spec('pip'), "
                    "u.find_spec('kubernetes.aio'))")
    assert result.stdout.decode().split() == ["None", "None"]


def test_run_converges_a_policy_and_stops_cleanly_on_sigterm(
        install: Install, admin_client: kubernetes.client.ApiClient,
        operator: OperatorContainer) -> None:
    container = operator.start(debounce="0.1")
    probe = container.exec("sh", "-c", "id -u; id -g; touch /probe 2>&1; touch /tmp/probe && "
                           "echo tmp-writable; grep -E '^CapEff' /proc/1/status")
    out = probe.stdout.decode()
    assert out.startswith("65532\n65532\n")
    assert "Read-only file system" in out and "tmp-writable" in out
    assert "CapEff:\t0000000000000000" in out

    # The chart's --leader-elect --lease-namespace=$(POD_NAMESPACE): this pod leads.
    coordination: Any = kubernetes.client.CoordinationV1Api(admin_client)

    def holder() -> str | None:
        try:
            lease = coordination.read_namespaced_lease(install.lease, install.release_ns)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return str(lease.spec.holder_identity or "") or None

    assert until(holder, 30, what="the Lease taken") == operator.pod_name
    custom: Any = kubernetes.client.CustomObjectsApi(admin_client)
    ns = install.watched
    custom.create_namespaced_custom_object(
        "mailtls.io", "v1alpha1", ns, "mailtlspolicies",
        policy("partner", ns, destinations=["partner.example"], level="encrypt"))
    core: Any = kubernetes.client.CoreV1Api(admin_client)

    def table() -> str:
        found = core.list_namespaced_config_map(
            ns, field_selector="metadata.name=relay-mailtls").items
        return str((found[0].data or {}).get("tls_policy", "")) if found else ""

    assert "partner.example encrypt\n" in until(table, 30, what="relay-mailtls")
    metrics = operator.get("metrics", "/metrics")
    assert metrics is not None and "mailtls_configmap_writes_total" in metrics

    code = container.stop(20)
    logs = container.logs()
    assert code == 0, logs[-4000:]
    assert "Traceback" not in logs, logs[max(0, logs.find("Traceback") - 600):][:6000]
    # the chart's RBAC was enough: no request refused by the authorizer (its message is
    # 'forbidden: User "…" cannot …'; other 403s, e.g. a foreign namespace being deleted
    # on this shared server, are not about RBAC)
    denied = re.search(r'forbidden: User \\?"[^"\\]*\\?" cannot', logs)
    assert denied is None, logs[max(0, denied.start() - 600):][:3000]
