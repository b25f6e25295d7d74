"""``mailtls run``: wire the operator to the cluster of the current kubeconfig and run Kopf."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from datetime import timedelta
from typing import Any

import kopf
from kubernetes import client, config

from ..controller import Config, Operator, operator_options, register
from ..discovery.engine import build_discoverer
from ..execrunner import KubernetesExecRunner
from ..kube import Kube
from ..leader import LeaderElector
from ..metrics import Metrics
from . import logs

log = logging.getLogger("mailtls")


def api_client() -> client.ApiClient:
    """In-cluster service account if present, else the current kubeconfig context."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "0.0.0.0", int(port)


def settings_for(args: argparse.Namespace) -> kopf.OperatorSettings:
    """Kopf settings: no handler progress stored on objects (we only watch), fast retries."""
    settings = kopf.OperatorSettings()
    settings.posting.level = logging.WARNING
    settings.networking.error_backoffs = [1, 2, 5, 10, 30]
    settings.watching.server_timeout = 600
    # Replicas coordinate through a Lease (mailtls_operator.leader), not Kopf peering, which
    # pauses every replica of equal priority.
    settings.peering.standalone = True
    # The CRD must exist before we start (checked), and namespaces are named, not globbed:
    # no need for Kopf to watch CRDs and namespaces (nor the RBAC for it).
    settings.scanning.disabled = True
    return settings


def run_operator(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        handlers=[logs.handler(args.log_format)])
    try:
        api = api_client()
    except Exception as exc:
        print(f"mailtls run: no cluster credentials: {exc}", file=sys.stderr)
        return 1
    cfg = Config(namespaces=list(args.namespace), debounce=args.debounce,
                 max_delay=args.max_delay, parallelism=args.parallelism,
                 default_strategy=args.strategy,
                 max_exception=timedelta(days=args.max_exception_days),
                 observe_interval=args.probe_interval,
                 probe_enforced=args.probe_scope == "all",
                 status_qps=args.status_qps, status_burst=max(1, int(args.status_qps * 5)))
    metrics = Metrics()
    if args.metrics != "off":
        metrics.serve(*_hostport(args.metrics))
    kube = Kube(api)
    leader = None
    if args.leader_elect:
        identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
        leader = LeaderElector(kube, args.lease_namespace, args.lease_name, identity)
    operator = Operator(kube, KubernetesExecRunner(api), cfg, metrics=metrics, leader=leader)
    try:  # MailTLSDiscovery lookups (issue 16)
        operator.discovery.discoverer = build_discoverer(args.discovery_nameserver,
                                                         args.discovery_ca_file)
    except (ValueError, OSError) as exc:
        print(f"mailtls run: discovery: {exc}", file=sys.stderr)
        return 2
    registry = kopf.OperatorRegistry()
    register(registry)

    @kopf.on.login(registry=registry)
    def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    host, port = _hostport(args.health)
    try:
        asyncio.run(kopf.operator(
            registry=registry, settings=settings_for(args), memo=kopf.Memo(operator=operator),
            namespaces=cfg.namespaces, clusterwide=not cfg.namespaces,
            standalone=True, liveness_endpoint=f"http://{host}:{port}/healthz",
            **operator_options()))
    except KeyboardInterrupt:
        return 0
    return 0
