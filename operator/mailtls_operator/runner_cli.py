"""``mailtls run``: the operator's command line (parsed here, run by :mod:`.operator_main`)."""

from __future__ import annotations

import argparse
from typing import Any


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
    peer = p.add_mutually_exclusive_group()
    peer.add_argument("--standalone", action="store_true",
                      help="no peering: only for a single replica (and tests)")
    peer.add_argument("--peering", metavar="NAME", default=None,
                      help="Kopf peering object shared by replicas; only the highest-priority "
                           "replica acts, so two replicas never roll out at once "
                           "(default: auto-detect)")
    p.add_argument("--priority", type=int, default=0,
                   help="this replica's peering priority (default: %(default)s)")
    p.add_argument("--health", metavar="HOST:PORT", default="0.0.0.0:8080",
                   help="serve /healthz (liveness/readiness) here (default: %(default)s)")
    p.add_argument("--metrics", metavar="HOST:PORT", default="0.0.0.0:9090",
                   help="serve Prometheus /metrics here; 'off' disables (default: %(default)s)")
    p.add_argument("--debounce", type=float, default=0.5, metavar="SECONDS",
                   help="quiet period before an instance is re-rendered after a change "
                        "(default: %(default)s)")
    p.add_argument("--max-delay", type=float, default=5.0, metavar="SECONDS",
                   help="longest a burst of changes may postpone a render (default: "
                        "%(default)s)")
    p.add_argument("--parallelism", type=int, default=1, metavar="N",
                   help="pods of one instance updated at once (default: %(default)s)")
    p.add_argument("--strategy", choices=("exec", "restart"), default="exec",
                   help="default rollout strategy when a pod has no mailtls.io/strategy "
                        "annotation (default: %(default)s)")
    p.add_argument("--max-exception-days", type=float, default=30.0, metavar="DAYS",
                   help="longest break-glass exception accepted (default: %(default)s)")
    p.add_argument("--probe-interval", type=float, default=3600.0, metavar="SECONDS",
                   help="how often destinations are probed with posttls-finger and queues "
                        "read; 0 disables the schedule (default: %(default)s)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .operator_main import run_operator

    return run_operator(args)
