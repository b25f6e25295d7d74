"""Prometheus metrics (DESIGN.md §6), in a registry of their own so tests can read them."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


@dataclass
class Metrics:
    """Every metric the operator exports, created on one registry."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.policies = Gauge("mailtls_policies", "MailTLSPolicy objects by Ready reason",
                              ["namespace", "reason"], registry=r)
        self.entries = Gauge("mailtls_table_entries", "Entries in an instance's TLS policy table",
                             ["namespace", "instance"], registry=r)
        self.pods_behind = Gauge("mailtls_pods_behind",
                                 "Pods of an instance not yet verified on the current revision",
                                 ["namespace", "instance"], registry=r)
        self.render_seconds = Histogram("mailtls_render_duration_seconds",
                                        "Time to render an instance's tables", registry=r)
        self.rollout_seconds = Histogram(
            "mailtls_rollout_duration_seconds", "Time to roll a revision out to an instance",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        self.rollout_failures = Counter("mailtls_rollout_failures_total",
                                        "Rollouts stopped by a failing pod",
                                        ["namespace", "instance"], registry=r)
        self.status_write_failures = Counter(
            "mailtls_status_write_failures_total",
            "Policy status writes refused or failed (retried with backoff)",
            ["namespace"], registry=r)
        self.configmap_writes = Counter("mailtls_configmap_writes_total",
                                        "ConfigMap creates and updates",
                                        ["namespace", "instance"], registry=r)
        self.exceptions_active = Gauge("mailtls_exceptions_active",
                                       "Break-glass exceptions currently in force",
                                       ["namespace"], registry=r)
        self.deferred = Gauge("mailtls_deferred_recipients",
                              "Recipients deferred for a TLS reason, by governing policy (a series "
                              "only while the policy has deferred mail)",
                              ["namespace", "policy", "instance"], registry=r)
        self.exception_start = Gauge(
            "mailtls_exception_start_timestamp_seconds",
            "Start of a break-glass exception's window, Unix time (a series only while the "
            "exception is in force)", ["namespace", "policy"], registry=r)
        self.exception_expiry = Gauge(
            "mailtls_exception_expiry_timestamp_seconds",
            "When a break-glass exception expires, Unix time (a series only while the "
            "exception is in force)", ["namespace", "policy"], registry=r)
        self.leader = Gauge("mailtls_leader",
                            "1 while this operator process may write (the leader, or running "
                            "without leader election), 0 while it stands by", registry=r)
        self.tls_sessions = Counter(
            "mailtls_tls_sessions_total",
            "TLS sessions Postfix reported (TLSRPT, agent strategy) under a policy's lines, by "
            "result: success or the RFC 8460 failure type (a series only once there was "
            "traffic)", ["namespace", "policy", "instance", "result"], registry=r)
        self.probe_failures = Gauge("mailtls_probe_failures",
                                    "Destinations whose last probe failed",
                                    ["namespace", "policy"], registry=r)

    def serve(self, host: str, port: int) -> None:
        """Serve /metrics over HTTP in a background thread."""
        start_http_server(port, addr=host, registry=self.registry)
