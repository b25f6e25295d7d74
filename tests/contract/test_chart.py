"""The Helm chart, rendered and linted offline by Helm's own Go code (helm-python-sdk)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from mailtls_operator.cli import build_parser
from mailtls_operator.controller import build_registry
from mailtls_operator.kube import API_CALLS

from .checks import all_problems
from .kit import (
    CHART,
    CHART_CRD_COPY,
    CRD_SOURCES,
    NAMESPACE,
    RELEASE,
    ROOT,
    Grant,
    chart_crd_objects,
    chart_objects,
    find,
    notes,
    operator_container,
    operator_grants,
    render_chart,
)

NAMESPACED = {"watchNamespaces": ["mail", "relay2"]}
RESTART = {"strategy": "restart"}
AGENT: dict[str, Any] = {"strategy": "agent", "agent": {
    "instances": [{"namespace": "mail", "name": "relay"}, {"namespace": "relay2", "name": "b"}]}}
EVERYTHING = {
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "podDisruptionBudget": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "Mail"}},
    "verbose": True,
    "extraArgs": ["--max-delay=9"],
    "image": {"digest": "sha256:" + "a" * 64},
}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": NAMESPACED,
    "restart": RESTART,
    "namespaced-restart": {**NAMESPACED, **RESTART},
    "agent": AGENT,
    "agent-tlsrpt": {**AGENT, "agent": {**AGENT["agent"], "tlsrpt": {"enabled": True}}},
    "namespaced-agent": {**NAMESPACED, **AGENT},
    "no-leader-election": {"leaderElection": {"enabled": False}, "replicaCount": 1},
    "one-replica": {"replicaCount": 1},
    "no-metrics": {"metrics": {"enabled": False}},
    "no-crd": {"crds": {"enabled": False}},
    "everything": EVERYTHING,
}

# What the operator calls, from its own code: kube.API_CALLS (every call of its API
# client, the Lease of leader election included), the resources its Kopf handlers watch
# (Kopf lists, then watches them), the exec runner (pods/exec over websocket: get, and
# create on newer API servers), and Kopf's own events (Kopf runs standalone: no
# kopf.dev peering objects). The chart must grant exactly this, nothing more.
def _watched() -> set[tuple[str, str, str]]:
    registry = build_registry()
    return {(verb, selector.group or "", str(selector.any_name))
            for selector in registry._watching.get_all_selectors() for verb in ("list", "watch")}


CALLS = set(API_CALLS) | _watched() | {("create", "", "events")}
CLUSTER_CALLS = {c for c in CALLS if c[2] == "customresourcedefinitions"}
#: Leader election: only with --leader-elect, only on the Lease in the release namespace.
LEASE_CALLS = {c for c in CALLS if (c[1], c[2]) == ("coordination.k8s.io", "leases")}
EXEC = {("", "pods/exec", "create"), ("", "pods/exec", "get")}
NAMESPACED_RIGHTS: set[tuple[str, str, str]] = {
    (group, resource, verb) for verb, group, resource in CALLS - CLUSTER_CALLS - LEASE_CALLS
} | EXEC
CRD_CHECK: Grant = ("*", "apiextensions.k8s.io", "customresourcedefinitions", "get",
                    "mailtlspolicies.mailtls.io")
#: The Lease is named after the release (the chart's fullname, here the release name).
LEASE_NAME = RELEASE
#: In the release namespace only; get and patch on the one Lease (resourceNames), create
#: on any (Kubernetes cannot restrict a create by name).
LEASE: set[Grant] = {(NAMESPACE, group, resource, verb, "*" if verb == "create" else LEASE_NAME)
                     for verb, group, resource in LEASE_CALLS}


def in_scope(scope: str, rights: set[tuple[str, str, str]]) -> set[Grant]:
    return {(scope, group, resource, verb, "*") for group, resource, verb in rights}


def test_the_operators_calls_are_what_the_design_says() -> None:
    crd_get = {("get", "apiextensions.k8s.io", "customresourcedefinitions")}
    assert crd_get == CLUSTER_CALLS
    assert {(g, r) for _, g, r in CALLS} == {
        ("mailtls.io", "mailtlspolicies"), ("mailtls.io", "mailtlspolicies/status"),
        ("mailtls.io", "mailtlsdiscoveries"), ("mailtls.io", "mailtlsdiscoveries/status"),
        ("", "pods"), ("", "configmaps"), ("", "events"),
        ("apps", "deployments"), ("apps", "statefulsets"), ("apps", "replicasets"),
        ("apiextensions.k8s.io", "customresourcedefinitions"),
        ("coordination.k8s.io", "leases")}
    assert {verb for verb, _, _ in LEASE_CALLS} == {"get", "create", "patch"}
    assert not [c for c in CALLS if c[1] == "kopf.dev"]




@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_renders_and_every_object_validates(variant: str) -> None:
    objects = chart_objects(VARIANTS[variant]) + chart_crd_objects()
    assert objects
    assert all_problems(objects) == []


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint_passes(variant: str) -> None:
    report = helm.lint(CHART, VARIANTS[variant], strict=True, namespace=NAMESPACE,
                       kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_default_render_has_the_expected_objects() -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in chart_objects())
    assert kinds == [
        ("ClusterRole", "mailtls-operator"),
        ("ClusterRole", "mailtls-operator-mailtlspolicy-editor"),
        ("ClusterRole", "mailtls-operator-mailtlspolicy-viewer"),
        ("ClusterRoleBinding", "mailtls-operator"),
        ("CustomResourceDefinition", "mailtlsdiscoveries.mailtls.io"),
        ("CustomResourceDefinition", "mailtlspolicies.mailtls.io"),
        ("Deployment", "mailtls-operator"),
        ("PodDisruptionBudget", "mailtls-operator"),
        ("Role", "mailtls-operator-leader-election"),
        ("RoleBinding", "mailtls-operator-leader-election"),
        ("Service", "mailtls-operator-metrics"),
        ("ServiceAccount", "mailtls-operator"),
    ]


# ----------------------------------------------------------------------------- RBAC


def test_default_grants_exactly_the_documented_rights_cluster_wide() -> None:
    assert operator_grants(chart_objects()) == (
        {CRD_CHECK} | in_scope("*", NAMESPACED_RIGHTS) | LEASE)


def test_namespaced_mode_grants_roles_per_namespace_and_only_the_crd_check_cluster_wide() -> None:
    objects = chart_objects(NAMESPACED)
    assert operator_grants(objects) == (
        {CRD_CHECK}
        | in_scope("mail", NAMESPACED_RIGHTS)
        | in_scope("relay2", NAMESPACED_RIGHTS)
        | LEASE)
    assert sorted((o["kind"], o["metadata"]["namespace"], o["metadata"]["name"])
                  for o in objects if o["kind"] in ("Role", "RoleBinding")) == sorted(
        [(kind, ns, "mailtls-operator") for kind in ("Role", "RoleBinding")
         for ns in ("mail", "relay2")]
        + [(kind, NAMESPACE, "mailtls-operator-leader-election")
           for kind in ("Role", "RoleBinding")])


def test_the_lease_rights_are_the_leader_elections_and_only_in_the_release_namespace() -> None:
    for values in ({}, NAMESPACED, RESTART):
        grants = operator_grants(chart_objects(values))
        assert {g for g in grants if g[2] == "leases"} == LEASE
    # No list/watch/update/delete on leases, nothing on leases cluster-wide, and the only
    # unnamed lease right is the create (which Kubernetes cannot restrict by name).
    assert {g[3] for g in LEASE if g[4] == "*"} == {"create"}
    # A watched namespace that is the release namespace: two Roles, no name clash.
    objects = chart_objects({"watchNamespaces": [NAMESPACE, "mail"]})
    assert all_problems(objects) == []
    roles = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
             for o in objects if o["kind"] in ("Role", "RoleBinding")]
    assert len(roles) == len(set(roles)) == 6
    assert operator_grants(objects) >= LEASE | in_scope(NAMESPACE, NAMESPACED_RIGHTS)


def test_lease_name_namespace_and_identity_agree_between_args_env_and_role() -> None:
    """Per release: another release (another fullname) elects on another Lease, and the
    Role names exactly the Lease the operator is told to use."""
    import helm_python as helm_

    for release, namespace in ((RELEASE, NAMESPACE), ("mta", "ops"), ("edge", "mail")):
        with helm_.Chart.load(CHART) as chart:
            rendered = chart.render({}, name=release, namespace=namespace, is_install=True)
        objects = [doc for path, text in rendered.items() if not path.endswith("NOTES.txt")
                   for doc in yaml.safe_load_all(text) if doc]
        container = operator_container(objects)
        parsed = build_parser().parse_args(container["args"])
        (role,) = [o for o in find(objects, "Role") if o["metadata"]["name"].endswith(
            "-leader-election")]
        (deployment,) = find(objects, "Deployment")
        assert role["metadata"]["namespace"] == namespace
        named = [r for r in role["rules"] if r.get("resourceNames")]
        assert [r["resourceNames"] for r in named] == [[parsed.lease_name]]
        assert parsed.lease_name == deployment["metadata"]["name"]
        assert parsed.leader_elect is True
        assert parsed.lease_namespace == "$(POD_NAMESPACE)"
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
           for e in operator_container(chart_objects())["env"]}
    assert env["POD_NAMESPACE"] == "metadata.namespace"
    assert env["POD_NAME"] == "metadata.name"  # the identity in holderIdentity


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variable_reference_in_the_args_is_defined(variant: str) -> None:
    """Kubernetes leaves an undefined $(VAR) in args verbatim: the Lease would be looked
    up in a namespace literally called "$(POD_NAMESPACE)"."""
    container = operator_container(chart_objects(VARIANTS[variant]))
    defined = {e["name"] for e in container.get("env", [])}
    for arg in container["args"]:
        assert set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg)) <= defined, arg


def test_without_leader_election_there_is_no_lease_right_one_replica_and_recreate(
        tmp_path: Path) -> None:
    values = {"leaderElection": {"enabled": False}, "replicaCount": 1}
    objects = chart_objects(values)
    assert not [g for g in operator_grants(objects) if g[2] == "leases"]
    assert find(objects, "Role") == [] and find(objects, "RoleBinding") == []
    args = operator_container(objects)["args"]
    assert not [a for a in args if a.startswith("--lease") or a == "--leader-elect"]
    (deployment,) = find(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "topologySpreadConstraints" not in deployment["spec"]["template"]["spec"]
    # Refused: more than one unelected operator, or an overlap during an upgrade. The
    # schema says so first; the template's own guard holds when it is skipped.
    for bad in ({"leaderElection": {"enabled": False}},  # the default replicaCount is 2
                {**values, "updateStrategy": {"type": "RollingUpdate"}}):
        with pytest.raises(helm.HelmValuesError):
            render_chart(bad)
    unchecked = tmp_path / "chart"
    shutil.copytree(CHART, unchecked)
    (unchecked / "values.schema.json").unlink()
    with helm.Chart.load(unchecked) as chart:
        for bad in ({"leaderElection": {"enabled": False}, "replicaCount": 3},
                    {**values, "updateStrategy": {"type": "RollingUpdate"}}):
            with pytest.raises(helm.HelmRenderError, match=r"needs leaderElection\.enabled"):
                chart.render(bad, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize("values", [RESTART, {**NAMESPACED, **RESTART}],
                         ids=["cluster-wide", "namespaced"])
def test_restart_strategy_grants_no_exec(values: dict[str, Any]) -> None:
    objects = chart_objects(values)
    grants = operator_grants(objects)
    assert not [g for g in grants if g[2] == "pods/exec"]
    scopes = values.get("watchNamespaces") or ["*"]
    assert grants == {CRD_CHECK} | LEASE | {
        g for scope in scopes for g in in_scope(scope, NAMESPACED_RIGHTS - EXEC)}
    assert "--strategy=restart" in operator_container(objects)["args"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_kopf_peering_anywhere(variant: str) -> None:
    """Kopf runs standalone: no kopf.dev rights, objects or CRDs, no peering options."""
    objects = chart_objects(VARIANTS[variant])
    assert not [g for g in operator_grants(objects) if g[1] == "kopf.dev"]
    assert not [o for o in objects if o["apiVersion"].startswith("kopf.dev/")]
    args = operator_container(objects)["args"]
    assert not [a for a in args if a.split("=")[0] in ("--peering", "--priority",
                                                       "--standalone")]


def test_nothing_still_talks_about_kopf_peering_objects_or_options() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert "peering" not in values
    stale = re.compile(r"--peering|--priority|--standalone|KopfPeering|kopfpeerings|POD_ID")
    files = [*CHART.rglob("*"), *(ROOT / "manifests").rglob("*.yaml"),
             ROOT / "docs" / "install.md", ROOT / "docs" / "gitops.md",
             ROOT / "tests" / "e2e" / "run.sh"]
    hits = [f"{f.relative_to(ROOT)}: {m.group(0)}" for f in files if f.is_file()
            for m in stale.finditer(f.read_text(encoding="utf-8"))]
    assert hits == []


def test_every_operator_rule_is_commented_as_framework_or_application() -> None:
    lines = (CHART / "templates" / "_rbac.tpl").read_text(encoding="utf-8").splitlines()
    rules = [i for i, line in enumerate(lines) if line.lstrip().startswith("- apiGroups:")]
    assert len(rules) >= 10
    for i in rules:
        block: list[str] = []
        for line in reversed(lines[:i]):
            text = line.strip()
            if text.startswith("{{"):  # a template guard between comment and rule
                continue
            if not text.startswith("#"):
                break
            block.insert(0, text)
        assert block and re.match(r"# (Framework|Application)\b", block[0]), (
            f"_rbac.tpl:{i + 1}: rule without a Framework/Application comment")


def test_people_get_viewer_and_editor_roles_aggregated_into_view_edit_admin() -> None:
    objects = chart_objects()
    viewer = find(objects, "ClusterRole", "mailtls-operator-mailtlspolicy-viewer")[0]
    editor = find(objects, "ClusterRole", "mailtls-operator-mailtlspolicy-editor")[0]
    assert viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert {k for k, v in editor["metadata"]["labels"].items() if v == "true"} >= {
        "rbac.authorization.k8s.io/aggregate-to-edit",
        "rbac.authorization.k8s.io/aggregate-to-admin"}
    editor_grants = {(g, r, v) for rule in editor["rules"] for g in rule["apiGroups"]
                     for r in rule["resources"] for v in rule["verbs"]}
    assert ("mailtls.io", "mailtlspolicies", "create") in editor_grants
    assert ("mailtls.io", "mailtlspolicies/status", "patch") not in editor_grants
    assert find(chart_objects({"rbac": {"aggregateClusterRoles": False}}), "ClusterRole") == \
        find(chart_objects(), "ClusterRole", "mailtls-operator")


# --------------------------------------------------------------- the operator pod


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_args_are_accepted_by_the_operators_own_command_line(variant: str) -> None:
    args = operator_container(chart_objects(VARIANTS[variant]))["args"]
    parsed = build_parser().parse_args(args)
    assert parsed.command == "run"


def test_default_args() -> None:
    assert operator_container(chart_objects())["args"] == [
        "run", "--all-namespaces", "--leader-elect", "--lease-namespace=$(POD_NAMESPACE)",
        "--lease-name=mailtls-operator",
        "--health=0.0.0.0:8080", "--metrics=0.0.0.0:9090", "--strategy=exec",
        "--debounce=0.5", "--max-delay=5", "--parallelism=1", "--max-exception-days=30",
        "--probe-interval=3600"]
    parsed = build_parser().parse_args(operator_container(chart_objects(NAMESPACED))["args"])
    assert parsed.namespace == ["mail", "relay2"]
    assert parsed.leader_elect is True
    assert parsed.lease_name == "mailtls-operator"


def test_restricted_security_context_probes_and_resources() -> None:
    (deployment,) = find(chart_objects(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert {"requests", "limits"} <= set(container["resources"])
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "http-metrics": 9090}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    for name, field in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
        assert {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field}}} in \
            container["env"]


def test_two_replicas_roll_one_at_a_time_spread_over_nodes_with_a_disruption_budget() -> None:
    """Leader election is on by default: a standby, RollingUpdate (the new pod starts as a
    standby before an old one stops), soft spreading, and a PDB that never blocks a drain."""
    objects = chart_objects()
    (deployment,) = find(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate",
                                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    (spread,) = spec["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    (pdb,) = find(objects, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == spec["selector"]

    mine = [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
             "whenUnsatisfiable": "DoNotSchedule",
             "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "operator"}}}]
    (custom,) = find(chart_objects({"topologySpreadConstraints": mine}), "Deployment")
    assert custom["spec"]["template"]["spec"]["topologySpreadConstraints"] == mine
    (one,) = find(chart_objects({"replicaCount": 1}), "Deployment")
    assert "topologySpreadConstraints" not in one["spec"]["template"]["spec"]
    assert one["spec"]["strategy"]["type"] == "RollingUpdate"  # still elected: no overlap
    (forced,) = find(chart_objects({"updateStrategy": {"type": "Recreate"}}), "Deployment")
    assert forced["spec"]["strategy"] == {"type": "Recreate"}


def test_metrics_service_and_service_monitor_select_the_operator() -> None:
    objects = chart_objects(EVERYTHING)
    (deployment,) = find(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (service,) = find(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http-metrics"
    (monitor,) = find(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    (pdb,) = find(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert operator_container(objects)["image"] == \
        "ghcr.io/mailtls/mailtls-operator@sha256:" + "a" * 64

    off = chart_objects({"metrics": {"enabled": False}})
    assert find(off, "Service") == [] and find(off, "ServiceMonitor") == []
    assert "--metrics=off" in operator_container(off)["args"]


def test_pod_disruption_budget_takes_one_of_min_available_or_max_unavailable() -> None:
    (pdb,) = find(chart_objects({"podDisruptionBudget": {"enabled": True, "minAvailable": 1}}),
                  "PodDisruptionBudget")
    assert pdb["spec"] == {"selector": pdb["spec"]["selector"], "minAvailable": 1}
    with pytest.raises(helm.HelmRenderError, match="not both"):
        render_chart({"podDisruptionBudget": {"enabled": True, "minAvailable": 1,
                                              "maxUnavailable": 1}})


# --------------------------------------------------------------------------- CRDs


def test_chart_crd_copy_is_byte_identical_to_the_source() -> None:
    for source in CRD_SOURCES:
        assert (CHART_CRD_COPY.parent / source.name).read_bytes() == source.read_bytes(), (
            "charts/mailtls-operator/files/crds/ is stale: "
            "run .venv/bin/python -m tests.contract.kit")


def _crds(values: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    return {c["metadata"]["name"]: c
            for c in find(chart_objects(values or {}), "CustomResourceDefinition")}


def test_templated_crds_are_the_source_crds_plus_labels_and_keep() -> None:
    sources = [yaml.safe_load(s.read_text(encoding="utf-8")) for s in CRD_SOURCES]
    crds = _crds()
    assert sorted(crds) == sorted(s["metadata"]["name"] for s in sources)
    for source in sources:
        crd = crds[source["metadata"]["name"]]
        assert crd["spec"] == source["spec"]
        assert source["metadata"]["labels"].items() <= crd["metadata"]["labels"].items()
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    for unkept in _crds({"crds": {"keep": False}}).values():
        assert "annotations" not in unkept["metadata"]
    assert find(chart_objects({"crds": {"enabled": False}}), "CustomResourceDefinition") == []
    argo = {"argocd.argoproj.io/sync-options": "Delete=false"}
    for annotated in _crds({"crds": {"annotations": argo}}).values():
        assert annotated["metadata"]["annotations"] == {**argo, "helm.sh/resource-policy": "keep"}


def test_chart_has_no_crds_dir_now_that_kopf_peering_is_gone() -> None:
    assert chart_crd_objects() == []
    assert not (CHART / "crds").exists()


# ------------------------------------------------------------------------- values


def test_values_yaml_validates_against_the_schema_and_bad_values_are_refused() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        cases: list[tuple[dict[str, Any], str]] = [
            ({"strategy": "reboot"}, "/strategy"),
            ({"replicaCount": -1}, "/replicaCount"),
            ({"leaderElection": {"enabled": False}, "replicaCount": 2}, "/replicaCount"),
            ({"leaderElection": {"enabled": False}, "updateStrategy": {"type": "RollingUpdate"}},
             "/updateStrategy/type"),
            ({"peering": {"enabled": True}}, "peering"),
            ({"watchNamespaces": ["Mail_NS"]}, "/watchNamespaces/0"),
            ({"stratgy": "exec"}, "stratgy"),
            ({"image": {"digest": "latest"}}, "/image/digest"),
            ({"rollout": {"parallelism": 0}}, "/rollout/parallelism"),
            ({"crds": {"enabled": "yes"}}, "/crds/enabled"),
        ]
        for bad, where in cases:
            with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
                chart.validate_schema(bad)
            with pytest.raises(helm.HelmValuesError):
                chart.render(bad, name="x", namespace="y")
        for good in ({"replicaCount": 5}, {"replicaCount": 0},
                     {"leaderElection": {"enabled": False}, "replicaCount": 1},
                     {"leaderElection": {"enabled": False}, "replicaCount": 0,
                      "updateStrategy": {"type": "Recreate"}}):
            chart.validate_schema(good)


def _leaf_and_map_paths(node: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            out.append(path)
            out.extend(_leaf_and_map_paths(value, path))
    return out


def test_schema_and_values_describe_the_same_keys() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))

    def schema_paths(node: dict[str, Any], prefix: str = "") -> list[str]:
        out = []
        for key, sub in node.get("properties", {}).items():
            path = f"{prefix}.{key}" if prefix else key
            out.append(path)
            out.extend(schema_paths(sub, path))
        return out

    declared = set(schema_paths(schema)) - {"global"}
    free_maps = {p for p in declared if p.split(".")[-1] in (
        "annotations", "labels", "podAnnotations", "podLabels", "nodeSelector",
        "podSecurityContext", "containerSecurityContext", "affinity", "requests", "limits")}
    in_values = {p for p in _leaf_and_map_paths(values)
                 if not any(p.startswith(f + ".") for f in free_maps)}
    assert in_values == declared
    for path in declared:
        node: dict[str, Any] = schema
        for part in path.split("."):
            node = node["properties"][part]
        assert node.get("description"), f"schema property {path} has no description"


def test_every_value_has_a_prose_comment() -> None:
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
    missing = []
    for i, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z0-9_./-]+:", line):
            previous = lines[i - 1].strip() if i else ""
            if not previous.startswith("#") or previous == "#":
                missing.append(f"values.yaml:{i + 1}: {line.strip()}")
    assert missing == []


@pytest.mark.parametrize("variant", ["default", "namespaced", "restart", "no-crd",
                                     "no-leader-election"])
def test_notes_render(variant: str) -> None:
    text = notes(VARIANTS[variant])
    assert "mailtls.io/instance" in text
    if variant == "no-leader-election":
        assert "no leader election" in text and "get lease" not in text
    else:
        assert "leader election on the Lease mailtls-system/mailtls-operator" in text
        assert "get lease mailtls-operator" in text
    if variant == "namespaced":
        assert "namespaces mail, relay2" in text
    if variant == "restart":
        assert "no pods/exec granted" in text
    if variant == "no-crd":
        assert "NOT managed by this release" in text
