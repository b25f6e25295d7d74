"""The kustomize trees under manifests/: valid offline, and equal in effect to the chart."""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailtls_operator.policy import validate_object

from .checks import all_problems, problems
from .kit import (
    BASE,
    CRD_SOURCE,
    EXAMPLES,
    NAMESPACE,
    OBSOLETE,
    OVERLAY_NAMESPACED,
    OVERLAY_NAMESPACES,
    chart_crd_objects,
    chart_objects,
    find,
    kustomize,
    operator_container,
    operator_grants,
    stale,
)

POLICIES = EXAMPLES / "policies"
POSTFIX = EXAMPLES / "postfix"
TREES = {"base": BASE, "overlay-namespaced": OVERLAY_NAMESPACED, "examples": EXAMPLES,
         "examples-postfix": POSTFIX}


def test_generated_files_are_current() -> None:
    assert stale() == [], "run .venv/bin/python -m tests.contract.kit"


def test_crd_copies_are_byte_identical() -> None:
    assert (BASE / "crds" / CRD_SOURCE.name).read_bytes() == CRD_SOURCE.read_bytes()
    assert sorted(p.name for p in (BASE / "crds").iterdir()) == [CRD_SOURCE.name]
    assert [p for p in OBSOLETE if p.exists()] == []  # Kopf's peering objects and CRDs


@pytest.mark.parametrize("tree", sorted(TREES))
def test_tree_builds_and_every_object_validates(tree: str) -> None:
    objects = kustomize(TREES[tree])
    assert objects
    assert all_problems(objects) == []


def test_the_validator_refuses_what_the_api_server_would() -> None:
    (deployment,) = find(kustomize(BASE), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    assert problems(deployment)
    (role,) = find(kustomize(BASE), "Role", "mailtls-operator-leader-election")
    assert problems(role) == []
    role["rules"][1]["resourceNames"] = "mailtls-operator"  # a string, not a list
    assert problems(role)
    (cluster_role,) = find(kustomize(BASE), "ClusterRole", "mailtls-operator")
    cluster_role["metadata"]["namespace"] = "mailtls-system"
    assert problems(cluster_role)
    policy = yaml.safe_load((POLICIES / "secure.yaml").read_text(encoding="utf-8"))
    policy["spec"]["level"] = "may"  # match and tafile are invalid with may
    assert problems(policy)


# ------------------------------------------------------- one source of truth in effect


def test_base_is_the_default_chart_in_effect() -> None:
    base, chart = kustomize(BASE), chart_objects()
    assert operator_grants(base) == operator_grants(chart)
    assert operator_container(base) == operator_container(chart)
    (base_deploy,), (chart_deploy,) = find(base, "Deployment"), find(chart, "Deployment")
    assert base_deploy["spec"]["template"]["spec"] == chart_deploy["spec"]["template"]["spec"]
    assert base_deploy["metadata"]["namespace"] == "mailtls-system"

    def names(objects: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
        return {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])
                for o in objects}

    # The chart plus its crds/ directory, and the namespace Helm is told to create.
    assert names(base) == names(chart + chart_crd_objects()) | {
        ("Namespace", "", "mailtls-system")}
    (base_crd,) = find(base, "CustomResourceDefinition", "mailtlspolicies.mailtls.io")
    (chart_crd,) = find(chart, "CustomResourceDefinition")
    assert base_crd["spec"] == chart_crd["spec"]


def test_namespaced_overlay_is_the_namespaced_chart_in_effect() -> None:
    overlay = kustomize(OVERLAY_NAMESPACED)
    chart = chart_objects({"watchNamespaces": OVERLAY_NAMESPACES})
    assert operator_grants(overlay) == operator_grants(chart)
    assert operator_container(overlay)["args"] == operator_container(chart)["args"]
    # The watched namespaces, and the release namespace for the Lease only.
    assert {g[0] for g in operator_grants(overlay)} == {"*", NAMESPACE, *OVERLAY_NAMESPACES}
    assert [g for g in operator_grants(overlay) if g[0] == "*"] == [
        ("*", "apiextensions.k8s.io", "customresourcedefinitions", "get",
         "mailtls.io".join(["mailtlspolicies.", ""]))]
    assert {g[2] for g in operator_grants(overlay) if g[0] == NAMESPACE} == {"leases"}
    assert {g for g in operator_grants(overlay) if g[2] == "leases"} == \
        {g for g in operator_grants(kustomize(BASE)) if g[2] == "leases"}


# ------------------------------------------------------------------------- examples


def test_examples_include_every_policy_file_and_the_policies_are_valid() -> None:
    built = [o for o in kustomize(EXAMPLES) if o["kind"] == "MailTLSPolicy"]
    on_disk = [doc for path in sorted(POLICIES.glob("*.yaml"))
               for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    assert sorted(o["metadata"]["name"] for o in built) == \
        sorted(o["metadata"]["name"] for o in on_disk)
    for obj in built:
        assert validate_object(obj) == [], obj["metadata"]["name"]


def _postfix_pod() -> tuple[dict[str, Any], dict[str, Any]]:
    objects = kustomize(POSTFIX)
    (deployment,) = find(objects, "Deployment", "relay")
    (config,) = [o for o in find(objects, "ConfigMap") if o["metadata"]["name"].startswith(
        "relay-postfix")]
    return deployment, config


def test_example_postfix_is_an_instance_the_operator_can_manage() -> None:
    deployment, config = _postfix_pod()
    template = deployment["spec"]["template"]
    assert deployment["metadata"]["namespace"] == "mail"
    assert template["metadata"]["labels"]["mailtls.io/instance"] == "relay"
    annotations = template["metadata"]["annotations"]
    assert annotations["mailtls.io/strategy"] in ("exec", "restart")
    assert annotations["mailtls.io/map-path"] == "/var/lib/mailtls/tls_policy"
    assert annotations["mailtls.io/map-type"] == "lmdb"
    pod = template["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    postfix = containers[annotations.get("mailtls.io/container", "postfix")]
    (init,) = pod["initContainers"]

    volumes = {v["name"]: v for v in pod["volumes"]}
    mailtls = next(v for v in volumes.values() if "configMap" in v
                   and v["configMap"]["name"] == "relay-mailtls")
    assert mailtls["configMap"]["optional"] is True

    def mounts(container: dict[str, Any]) -> dict[str, str]:
        return {m["mountPath"]: m["name"] for m in container["volumeMounts"]}

    table_dir = str(Path(annotations["mailtls.io/map-path"]).parent)
    for container in (postfix, init):
        assert mounts(container)["/etc/mailtls"] == mailtls["name"]
        assert "emptyDir" in volumes[mounts(container)[table_dir]]
    assert mounts(postfix)[table_dir] == mounts(init)[table_dir]

    main_cf = dict(re.findall(r"^(\w+) = (.*)$", config["data"]["main.cf"], re.MULTILINE))
    map_type, map_path = annotations["mailtls.io/map-type"], annotations["mailtls.io/map-path"]
    assert main_cf["smtp_tls_policy_maps"] == f"{map_type}:{map_path}"
    assert main_cf["transport_maps"] == f"{map_type}:{table_dir}/transport"
    init_env = {e["name"]: e["value"] for e in init["env"]}
    assert init_env == {"SRC": "/etc/mailtls", "DST": table_dir, "MAP_TYPE": map_type}
    assert "load-tables.sh" in config["data"]

    # Non-root where possible: the init container; Postfix's master needs root.
    assert init["securityContext"]["runAsNonRoot"] is True
    for container in (init, postfix):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
    assert "SYS_ADMIN" not in postfix["securityContext"]["capabilities"].get("add", [])


def test_example_policies_target_the_example_instance() -> None:
    deployment, _ = _postfix_pod()
    instance = deployment["spec"]["template"]["metadata"]["labels"]["mailtls.io/instance"]
    for obj in kustomize(EXAMPLES):
        if obj["kind"] == "MailTLSPolicy":
            assert obj["metadata"]["namespace"] == deployment["metadata"]["namespace"]
            assert instance in obj["spec"].get("instances", [instance])


# ------------------------------------------------- the init container, on real Postfix


def _postmap_with_lmdb(config: Path) -> str | None:
    """postmap, if Postfix and its lmdb table type are installed (Debian: postfix-lmdb)."""
    postmap = shutil.which("postmap") or "/usr/sbin/postmap"
    if not Path(postmap).exists():
        return None
    types = subprocess.run([str(Path(postmap).with_name("postconf")), "-c", str(config), "-m"],
                           capture_output=True, text=True, timeout=10, check=False).stdout
    return postmap if "lmdb" in types.split() else None


@pytest.mark.postfix
def test_load_tables_script_with_real_postmap(tmp_path: Path) -> None:
    etc, src, dst = tmp_path / "etc", tmp_path / "src", tmp_path / "dst"
    for d in (etc, src, dst):
        d.mkdir()
    # A config directory of our own (never /etc/postfix): main.cf, plus Debian's
    # dynamicmaps.cf(.d), which is where the lmdb table type is registered.
    (etc / "main.cf").write_text("compatibility_level = 3.6\n")
    if Path("/etc/postfix/dynamicmaps.cf").is_file():
        shutil.copy("/etc/postfix/dynamicmaps.cf", etc)
    if Path("/etc/postfix/dynamicmaps.cf.d").is_dir():
        shutil.copytree("/etc/postfix/dynamicmaps.cf.d", etc / "dynamicmaps.cf.d")
    postmap = _postmap_with_lmdb(etc)
    if postmap is None:
        pytest.skip("needs Postfix with lmdb (make system-deps)")
    script = POSTFIX / "load-tables.sh"
    env = {"PATH": f"{Path(postmap).parent}:/usr/bin:/bin", "SRC": str(src), "DST": str(dst),
           "MAP_TYPE": "lmdb", "POSTFIX_CONFIG": str(etc)}

    def run() -> str:
        result = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True,
                                timeout=30, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def query(table: str, key: str) -> str | None:
        result = subprocess.run([postmap, "-c", str(etc), "-q", key, f"lmdb:{dst / table}"],
                                capture_output=True, text=True, timeout=10, check=False)
        return result.stdout.strip() if result.returncode == 0 else None

    # No ConfigMap yet: both tables exist, empty (a missing table defers all mail).
    assert "(none: empty table)" in run()
    assert (dst / "tls_policy.lmdb").is_file() and (dst / "transport.lmdb").is_file()
    assert query("tls_policy", "example.com") is None

    # Plain data keys.
    (src / "tls_policy").write_text("# revision: 9f2c\nexample.com secure match=nexthop\n")
    (src / "transport").write_text("example.com smtp:example.com\n")
    assert "(revision 9f2c)" in run()
    assert query("tls_policy", "example.com") == "secure match=nexthop"
    assert query("transport", "example.com") == "smtp:example.com"

    # A large table arrives gzip-compressed in binaryData (tls_policy.gz).
    (src / "tls_policy").unlink()
    (src / "tls_policy.gz").write_bytes(gzip.compress(b"big.example encrypt\n"))
    run()
    assert query("tls_policy", "big.example") == "encrypt"
    assert query("tls_policy", "example.com") is None
    assert not list(dst.glob(".*")), "temporary files left behind"


def test_every_tafile_of_the_example_policies_exists_in_the_postfix_pod() -> None:
    objects = kustomize(EXAMPLES)
    (deployment,) = find(objects, "Deployment", "relay")
    pod = deployment["spec"]["template"]["spec"]
    (postfix,) = [c for c in pod["containers"] if c["name"] == "postfix"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    configmaps = {o["metadata"]["name"]: o for o in find(objects, "ConfigMap")}
    tafiles = {t for o in find(objects, "MailTLSPolicy") for t in o["spec"].get("tafile", [])}
    assert tafiles
    for tafile in tafiles:
        directory, name = str(Path(tafile).parent), Path(tafile).name
        (mount,) = [m for m in postfix["volumeMounts"] if m["mountPath"] == directory]
        source = configmaps[volumes[mount["name"]]["configMap"]["name"]]
        assert "-----BEGIN CERTIFICATE-----" in source["data"][name], tafile

