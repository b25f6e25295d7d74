"""The real operator alone in a process, for measuring its footprint (RSS, CPU).

``python -m bench.operator_proc --kubeconfig FILE --namespace NS``: Kopf with the
operator's handlers, logged in to the kube-apiserver of FILE (the parent's cluster, as
the operator's own ServiceAccount) and watching namespace NS, pod commands through the
production exec runner (``pods/exec`` of kube-apiserver; kwok runs them against local
Postfix instances).  Settings as ``mailtls run`` has them, plus the fast timeouts of the
integration tests.  Stops on SIGTERM/SIGINT (Kopf's own handlers: main thread).
Imports nothing of the tests or of the test bed, so its RSS is the operator's.
``--tracemalloc``: see ``_trace_to``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import dataclasses
import gc
import json
import logging
import signal
import sys
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import kopf


def kopf_settings() -> kopf.OperatorSettings:
    """The bench's Kopf settings, in-process (``bench.harness``) and here: ``mailtls
    run``'s with the short backoffs of the tests, but a request timeout for a server
    under load (30 s, not the tests' 5 s) and no Kopf Events below WARNING."""
    import kopf

    settings = kopf.OperatorSettings()
    settings.posting.level = logging.WARNING
    settings.peering.standalone = True
    settings.scanning.disabled = True
    settings.networking.error_backoffs = [0.1, 0.2, 0.5]
    settings.networking.request_timeout = 30
    settings.watching.connect_timeout = 2
    settings.queueing.exit_timeout = 2
    return settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--debounce", type=float, default=0.5)
    parser.add_argument("--max-delay", type=float, default=5.0)
    parser.add_argument("--probes", action="store_true",
                        help="probe enforce-mode policies too (the operator's default)")
    parser.add_argument("--report", help="write the RSS after each import stage here (JSON)")
    parser.add_argument("--tracemalloc", metavar="FILE", default="",
                        help="SIGUSR2 starts tracing allocations (10 frames), SIGUSR1 writes a "
                             "snapshot to FILE")
    parser.add_argument("--trace-from-start", action="store_true",
                        help="trace allocations from the end of the imports on")
    args = parser.parse_args()
    _trace_to(args.tracemalloc)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    stages = {"interpreter": _rss_mib()}
    import kopf
    from kubernetes import client, config

    from mailtls_operator.controller import Config, Operator, operator_options, register
    from mailtls_operator.execrunner import KubernetesExecRunner
    from mailtls_operator.kube import Kube

    stages["operator imports"] = _rss_mib()
    if args.trace_from_start:
        tracemalloc.start(10)
    if args.report:
        Path(args.report).write_text(json.dumps(stages))
    config.load_kube_config(config_file=args.kubeconfig)  # type: ignore[no-untyped-call]
    api = client.ApiClient()
    fields = {f.name for f in dataclasses.fields(Config)}
    settings_: dict[str, Any] = {"debounce": args.debounce, "max_delay": args.max_delay,
                                 "namespaces": [args.namespace]}
    if not args.probes and "probe_enforced" in fields:
        settings_["probe_enforced"] = False  # as bench.harness.bench_config
    operator = Operator(Kube(api), KubernetesExecRunner(api), Config(**settings_))
    registry = kopf.OperatorRegistry()
    register(registry)

    @kopf.on.login(registry=registry)
    def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)  # the kubeconfig loaded above

    asyncio.run(kopf.operator(registry=registry, settings=kopf_settings(), standalone=True,
                              clusterwide=False, namespaces=[args.namespace],
                              memo=kopf.Memo(operator=operator),
                              **operator_options()))


def _trace_to(path: str) -> None:
    """Where the memory is, for investigations (not for figures: tracing costs time and
    memory).  SIGUSR2 starts tracemalloc (10 frames).  SIGUSR1 prints pymalloc's arenas
    and pools, glibc's arenas and a census of the live container objects to the log,
    and writes the tracemalloc snapshot to ``path`` (when given and tracing)."""

    def start(*_: Any) -> None:
        tracemalloc.start(10)

    def dump(*_: Any) -> None:
        gc.collect()
        sys._debugmallocstats()  # to stderr, the log
        libc = ctypes.util.find_library("c")
        if libc:
            ctypes.CDLL(libc).malloc_stats()  # to stderr
        census: dict[str, list[int]] = {}
        for obj in gc.get_objects():
            entry = census.setdefault(type(obj).__qualname__, [0, 0])
            entry[0] += 1
            entry[1] += sys.getsizeof(obj)
        top = sorted(census.items(), key=lambda kv: -kv[1][1])[:40]
        print("census (gc-tracked objects): " + json.dumps(top), file=sys.stderr, flush=True)
        if path and tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(path)

    signal.signal(signal.SIGUSR2, start)
    signal.signal(signal.SIGUSR1, dump)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    main()
