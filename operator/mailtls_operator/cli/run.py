"""``mailtls run``: the operator's command line (parsed here, run by :mod:`.operate`)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .argtypes import bounded_float, bounded_int, listen_address, listen_address_or_off
from .logs import FORMATS
from .offline import MAX_EXCEPTION_DAYS


def add_run_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "run", help="run the operator against the cluster of the current kubeconfig",
        description="Watch MailTLSPolicy objects and Postfix pods (label mailtls.io/instance), "
                    "write one ConfigMap <instance>-mailtls per Postfix instance and roll the "
                    "table out to its pods. Uses the in-cluster service account, else the "
                    "current kubeconfig context. The CRD must already be installed (Helm "
                    "chart or manifests/); the operator never creates it.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="watch only this namespace (repeatable); default: all namespaces")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="watch every namespace (the default)")
    p.add_argument("--leader-elect", action="store_true",
                   help="run as one of several replicas: only the holder of the Lease "
                        "LEASE_NAMESPACE/LEASE_NAME converges and rolls out; the others watch "
                        "and take over within a lease period (15 s). Without it the operator "
                        "assumes it is the only one.")
    p.add_argument("--lease-namespace", metavar="NS",
                   default=os.environ.get("POD_NAMESPACE", "default"),
                   help="namespace of the Lease (default: $POD_NAMESPACE, else 'default')")
    p.add_argument("--lease-name", metavar="NAME", default="mailtls-operator",
                   help="name of the Lease (default: %(default)s)")
    p.add_argument("--health", type=listen_address, metavar="HOST:PORT", default="0.0.0.0:8080",
                   help="serve /healthz (liveness/readiness) here (default: %(default)s)")
    p.add_argument("--metrics", type=listen_address_or_off, metavar="HOST:PORT",
                   default="0.0.0.0:9090",
                   help="serve Prometheus /metrics here; 'off' disables (default: %(default)s)")
    p.add_argument("--debounce", type=bounded_float(0, 3600), default=0.5, metavar="SECONDS",
                   help="quiet period before an instance is re-rendered after a change "
                        "(default: %(default)s)")
    p.add_argument("--max-delay", type=bounded_float(0, 3600), default=5.0, metavar="SECONDS",
                   help="longest a burst of changes may postpone a render (default: "
                        "%(default)s)")
    p.add_argument("--parallelism", type=bounded_int(1, 10_000), default=1, metavar="N",
                   help="pods of one instance updated at once (default: %(default)s)")
    p.add_argument("--strategy", choices=("exec", "restart", "agent"), default="exec",
                   help="default rollout strategy when a pod has no mailtls.io/strategy "
                        "annotation (default: %(default)s)")
    p.add_argument("--max-exception-days", type=MAX_EXCEPTION_DAYS, default=30.0, metavar="DAYS",
                   help="longest break-glass exception accepted (default: %(default)s)")
    p.add_argument("--probe-interval", type=bounded_float(0, 30 * 86400), default=3600.0,
                   metavar="SECONDS",
                   help="how often destinations are probed with posttls-finger and queues "
                        "read; 0 disables the schedule (default: %(default)s)")
    p.add_argument("--probe-scope", choices=("all", "audit"), default="all",
                   help="probe every policy's destinations (a failing probe of an enforced "
                        "policy is a warning in its Verified condition), or only audit-mode "
                        "policies (default: %(default)s)")
    p.add_argument("--discovery-nameserver", metavar="HOST[:PORT]",
                   help="DNS server for MailTLSDiscovery (MTA-STS, DANE): DANE needs a "
                        "DNSSEC-validating resolver (AD bit) on a trusted path; default: "
                        "the system resolver")
    p.add_argument("--discovery-ca-file", metavar="FILE",
                   help="CA certificates for MTA-STS policy fetches (default: system store)")
    p.add_argument("--status-qps", type=bounded_float(0, 1e6), default=100.0, metavar="N",
                   help="policy status patches per second at most, in bursts of up to 5x "
                        "that: a bulk load's statuses follow its enforcement instead of "
                        "flooding the API server; 0 means unlimited (default: %(default)s)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.add_argument("--log-format", choices=FORMATS, default="json",
                   help="stderr log lines: one JSON object each, or plain text "
                        "(default: %(default)s)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .operate import run_operator  # here: keeps kopf off the offline commands

    return run_operator(args)
