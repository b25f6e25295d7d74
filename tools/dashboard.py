"""The operator's Grafana dashboard, built from code with grafana-foundation-sdk.

Why code and not hand-edited JSON: every query lives once, in :data:`PANELS`, where the
dashboard test (tests/cluster/operating/test_dashboard_prometheus.py) reads the same expressions
and runs them against a real Prometheus scraping a running operator, so no panel can
ask for a metric or label the operator does not export. The generated JSON is committed
(charts/mailtls-operator/files/dashboards/mailtls-operator.json, loaded by the chart's
ConfigMap) and a contract test regenerates it and compares.

    python tools/dashboard.py           # write the JSON
    python tools/dashboard.py --check   # exit 1 if the committed JSON is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    Row,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery as PrometheusQuery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "charts/mailtls-operator/files/dashboards/mailtls-operator.json"
UID = "mailtls-operator"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
#: Grafana's rate window: at least four scrape intervals. The dashboard test puts a fixed
#: window in its place, since Prometheus alone does not know the variable.
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Target:
    """One query of a panel, and how its series are named in the legend."""

    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    """A panel: its row, title, what it tells the reader, unit and queries."""

    row: str
    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    stat: bool = False


def _t(expr: str, legend: str) -> Target:
    return Target(expr, legend)


#: Every panel, in order. Series of several operator replicas are folded with max: only the
#: leader acts, and a standby exports what it last saw (or nothing).
PANELS: tuple[PanelSpec, ...] = (
    PanelSpec("Rollouts", "Table entries per instance",
              "Lines in each instance's TLS policy table (the revision key not counted).",
              (_t("max by (namespace, instance) (mailtls_table_entries)",
                  "{{namespace}}/{{instance}}"),)),
    PanelSpec("Rollouts", "Revisions written per instance",
              "ConfigMap creates and updates per second: each is a new table revision.",
              (_t(f"sum by (namespace, instance) "
                  f"(rate(mailtls_configmap_writes_total[{RATE}]))",
                  "{{namespace}}/{{instance}}"),), unit="ops"),
    PanelSpec("Rollouts", "Rollout duration",
              "How long a revision takes to reach every ready pod (quantiles over all "
              "instances).",
              (_t(f"histogram_quantile(0.5, sum by (le) "
                  f"(rate(mailtls_rollout_duration_seconds_bucket[{RATE}])))", "p50"),
               _t(f"histogram_quantile(0.9, sum by (le) "
                  f"(rate(mailtls_rollout_duration_seconds_bucket[{RATE}])))", "p90")),
              unit="s"),
    PanelSpec("Rollouts", "Pods behind",
              "Pods of an instance not yet verified on its current revision.",
              (_t("max by (namespace, instance) (mailtls_pods_behind)",
                  "{{namespace}}/{{instance}}"),)),
    PanelSpec("Rollouts", "Rollout failures",
              "Rollouts stopped by a failing pod (retried with backoff).",
              (_t(f"sum by (namespace, instance) "
                  f"(increase(mailtls_rollout_failures_total[{RATE}]))",
                  "{{namespace}}/{{instance}}"),)),
    PanelSpec("Mail", "Deferred mail by policy",
              "Recipients deferred for a TLS reason, by the policy governing the "
              "destination (a series only while a policy has deferred mail).",
              (_t("max by (namespace, policy, instance) (mailtls_deferred_recipients)",
                  "{{namespace}}/{{policy}} on {{instance}}"),)),
    PanelSpec("Mail", "TLS sessions by result per policy",
              "TLS handshakes per minute under each policy's lines, by result: success or "
              "the RFC 8460 failure type (Postfix >= 3.10's TLSRPT, through the agent "
              "sidecar). Only next-hops that publish a TLSRPT policy are reported; a "
              "policy has series once it had sessions.",
              (_t(f"sum by (namespace, policy, result) "
                  f"(rate(mailtls_tls_sessions_total[{RATE}])) * 60",
                  "{{namespace}}/{{policy}} {{result}}"),), unit="opm"),
    PanelSpec("Exceptions and probes", "Exceptions in force",
              "Break-glass exceptions currently in force, per namespace.",
              (_t("max by (namespace) (mailtls_exceptions_active)", "{{namespace}}"),)),
    PanelSpec("Exceptions and probes", "Exception windows",
              "Per exception in force: days since it started and days until it expires.",
              (_t("(time() - max by (namespace, policy) "
                  "(mailtls_exception_start_timestamp_seconds)) / 86400",
                  "{{namespace}}/{{policy}} in force"),
               _t("(max by (namespace, policy) "
                  "(mailtls_exception_expiry_timestamp_seconds) - time()) / 86400",
                  "{{namespace}}/{{policy}} expires in")), unit="d"),
    PanelSpec("Exceptions and probes", "Probes failing",
              "Destinations whose last probe failed, per policy.",
              (_t("max by (namespace, policy) (mailtls_probe_failures)",
                  "{{namespace}}/{{policy}}"),)),
    PanelSpec("Discovery", "Discovered domains",
              "Domains of each MailTLSDiscovery by source and mode.",
              (_t("max by (namespace, discovery, source, mode) (mailtls_discovered_domains)",
                  "{{namespace}}/{{discovery}} {{source}} {{mode}}"),)),
    PanelSpec("Discovery", "Discovery failing domains",
              "Domains whose last lookup or refresh failed, per MailTLSDiscovery.",
              (_t("max by (namespace, discovery) (mailtls_discovery_failing_domains)",
                  "{{namespace}}/{{discovery}}"),)),
    PanelSpec("Operator", "API writes",
              "ConfigMap writes, and policy status writes refused or failed, per second.",
              (_t(f"sum by (namespace) (rate(mailtls_configmap_writes_total[{RATE}]))",
                  "{{namespace}} ConfigMap writes"),
               _t(f"sum by (namespace) "
                  f"(rate(mailtls_status_write_failures_total[{RATE}]))",
                  "{{namespace}} status write failures")), unit="ops"),
    PanelSpec("Operator", "Policies by Ready reason",
              "MailTLSPolicy objects by the reason of their Ready condition.",
              (_t("max by (namespace, reason) (mailtls_policies)",
                  "{{namespace}} {{reason}}"),)),
    PanelSpec("Operator", "Leader",
              "Operator processes that may write (1 with one leader) and processes "
              "exporting metrics.",
              (_t("sum(mailtls_leader)", "leaders"),
               _t("count(mailtls_leader)", "processes")), stat=True),
)


def _panel(number: int, spec: PanelSpec) -> Stat | Timeseries:
    panel: Stat | Timeseries = Stat() if spec.stat else Timeseries()
    panel.id(number).title(spec.title).description(spec.description).unit(spec.unit)
    panel.datasource(DATASOURCE).height(8).span(8)
    if isinstance(panel, Timeseries):
        panel.min(0)
    for ref, target in zip("ABCDEFGH", spec.targets, strict=False):
        panel.with_target(PrometheusQuery().ref_id(ref).expr(target.expr)
                          .legend_format(target.legend).datasource(DATASOURCE))
    return panel


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (a plain dict)."""
    dash = (Dashboard("mailtls-operator").uid(UID)
            .description("Rollouts, deferred mail, TLS session outcomes, exceptions, probes, "
                         "discovery and API writes of mailtls-operator.")
            .tags(["mailtls", "postfix", "operator"])
            .refresh("30s").time("now-6h", "now")
            .with_variable(DatasourceVariable("datasource").label("Data source")
                           .type("prometheus")))
    row = ""
    number = 0
    for spec in PANELS:
        if spec.row != row:
            row, number = spec.row, number + 1
            dash.with_row(Row(row).id(number))
        number += 1
        dash.with_panel(_panel(number, spec))
    encoded = json.dumps(dash.build(), cls=JSONEncoder, sort_keys=True)
    result: dict[str, Any] = json.loads(encoded)
    return result


def render() -> str:
    """The committed file's exact text."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed JSON instead of writing it")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(REPO)} is stale: run python tools/dashboard.py",
                  file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
