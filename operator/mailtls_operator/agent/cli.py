"""``mailtls agent``: the in-pod sidecar of the ``agent`` strategy (DESIGN.md §11).

Every flag has an environment default where the pod spec naturally provides
one (the Downward API for the pod's name and namespace).  The agent needs no
writable root filesystem and no root: it writes only the table directory
(an emptyDir shared with the Postfix container) and talks to the API server
with its own service account.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path

from .. import postfix, rollout


def add_agent_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    env = os.environ.get
    p = sub.add_parser(
        "agent", help="run in a Postfix pod: apply, verify, probe and release without exec",
        description="Watch this instance's ConfigMap through the API (the mounted copy is "
                    "the fallback at start and during API outages), install each revision "
                    "(postmap into a temporary file, atomic rename, verify the revision "
                    "sentinel; Postfix is never restarted), probe the destinations the "
                    "ConfigMap lists, release mail deferred under changed keys, and report "
                    "in this pod's mailtls.io/* annotations.",
        epilog="Runs until SIGTERM. Needs: get/watch on the instance's ConfigMaps (by "
               "resourceNames) and patch on this pod (limited to its own mailtls.io "
               "annotations by the chart's admission policy).")
    p.add_argument("--instance", default=env("MAILTLS_INSTANCE"), required=not env(
                   "MAILTLS_INSTANCE"), help="the Postfix instance (label mailtls.io/instance) "
                   "whose ConfigMap <instance>-mailtls to follow [env MAILTLS_INSTANCE]")
    p.add_argument("--namespace", default=env("POD_NAMESPACE"), required=not env(
                   "POD_NAMESPACE"), help="this pod's namespace [env POD_NAMESPACE]")
    p.add_argument("--pod", default=env("POD_NAME"), required=not env("POD_NAME"),
                   help="this pod's name, the only pod the agent reports on [env POD_NAME]")
    p.add_argument("--map-path", default=rollout.DEFAULT_MAP_PATH,
                   help="writable path of the TLS policy table, as main.cf names it "
                        "(default: %(default)s)")
    p.add_argument("--map-type", default=rollout.DEFAULT_MAP_TYPE,
                   choices=sorted(postfix.MAP_TYPES), help="table type (default: %(default)s)")
    p.add_argument("--transport-path", default=None,
                   help="path of the transport table (default: 'transport' beside --map-path)")
    p.add_argument("--reload", action="store_true",
                   help="run 'postfix reload' after every swap, even for indexed tables")
    p.add_argument("--postfix-config", default=env("MAIL_CONFIG"), metavar="DIR",
                   help="Postfix configuration directory (MAIL_CONFIG; default: Postfix's own)")
    p.add_argument("--postfix-path", default=None, metavar="DIR[:DIR...]",
                   help="look for the Postfix tools here before /usr/sbin:/usr/bin:/sbin:/bin "
                        "(an image that installs them elsewhere, such as /usr/local/sbin)")
    p.add_argument("--configmap-dir", type=Path, default=Path("/etc/mailtls"),
                   help="where the ConfigMap is mounted: the fallback (default: %(default)s)")
    p.add_argument("--parts-dir", type=Path, default=Path("/etc/mailtls-parts"),
                   help="where the part ConfigMaps are mounted (default: %(default)s)")
    p.add_argument("--api-url", default=None,
                   help="API server URL without credentials (tests); default: the in-cluster "
                        "service account, or --kubeconfig")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file instead of in-cluster")
    p.add_argument("--observe-interval", type=float, default=300.0, metavar="SECONDS",
                   help="read the queue and probe due destinations this often, besides after "
                        "every change (default: %(default)g)")
    p.add_argument("--probe-interval", type=float, default=3600.0, metavar="SECONDS",
                   help="probe an unchanged policy again after this long; 0: only after "
                        "changes (default: %(default)g)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="limit for each Postfix command (default: %(default)g)")
    p.add_argument("--api-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="limit for each API request (default: %(default)g)")
    p.add_argument("--retry-max", type=float, default=30.0, metavar="SECONDS",
                   help="longest wait between attempts to reach the API (default: %(default)g)")
    p.add_argument("--watch-timeout", type=int, default=300, metavar="SECONDS",
                   help="server-side length of one watch request (default: %(default)s)")
    p.add_argument("--tlsrpt-socket", default="auto", metavar="auto|off|PATH",
                   help="receive Postfix's TLSRPT datagrams (Postfix >= 3.10, "
                        "smtp_tlsrpt_enable = yes) and report TLS session outcomes per "
                        "policy key: 'auto' binds where main.cf says "
                        "($queue_directory/$smtp_tlsrpt_socket_name, on a volume both "
                        "containers share), 'off' collects nothing (default: %(default)s)")
    p.add_argument("--outcomes-window", type=float, default=3600.0, metavar="SECONDS",
                   help="rolling window of the reported session counts (default: %(default)g)")
    p.add_argument("--outcomes-interval", type=float, default=15.0, metavar="SECONDS",
                   help="look at the counts this often and report them when they changed "
                        "(default: %(default)g)")
    p.add_argument("--tlsrpt-rate", type=int, default=500, metavar="N",
                   help="read at most N datagrams a second; a flood beyond waits in, then is "
                        "dropped by, the socket buffer (default: %(default)s)")
    p.add_argument("--tlsrpt-forward", default=None, metavar="PATH",
                   help="also pass every datagram that parsed on to this unix datagram socket "
                        "(tlsrpt-collectd's, for RFC 8460 reports by tlsrpt-reportd; "
                        "docs/tlsrpt.md); off by default")
    p.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="log level (default: %(default)s)")
    p.set_defaults(func=cmd_agent)


def cmd_agent(args: argparse.Namespace) -> int:
    from ..cli.probe import SBIN_PATH
    from .api import AgentApi
    from .converge import Converger, PodSettings
    from .loop import Agent, LoopSettings
    from .runner import ProcessRunner
    from .tlsrpt import OutcomeCollector

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = PodSettings(args.namespace, args.pod, args.map_path, args.map_type,
                               args.transport_path, args.reload, args.timeout,
                               args.probe_interval)
        settings.target()  # refuses a bad path or type before anything runs
    except postfix.InvalidArgument as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.outcomes_window <= 0 or args.outcomes_interval <= 0 or args.tlsrpt_rate < 1:
        print("error: --outcomes-window and --outcomes-interval must be positive, "
              "--tlsrpt-rate at least 1", file=sys.stderr)
        return 2
    if args.api_url:
        api = AgentApi(args.api_url, timeout=args.api_timeout)
    elif args.kubeconfig:
        api = AgentApi.from_kubeconfig(args.kubeconfig, timeout=args.api_timeout)
    else:
        api = AgentApi.in_cluster(timeout=args.api_timeout)
    env = None if not args.postfix_path else {
        "PATH": f"{args.postfix_path}:{SBIN_PATH}", "LANG": "C.UTF-8"}
    agent = Agent(api, Converger(ProcessRunner(args.postfix_config, env), settings),
                  LoopSettings(args.instance, args.configmap_dir, args.parts_dir,
                               args.observe_interval, retry_max=args.retry_max,
                               watch_timeout=args.watch_timeout,
                               tlsrpt_socket=args.tlsrpt_socket,
                               outcomes_interval=args.outcomes_interval),
                  OutcomeCollector(window=args.outcomes_window, rate=args.tlsrpt_rate,
                                   forward=args.tlsrpt_forward))

    async def main() -> None:
        try:
            await agent.run()
        finally:
            await api.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0
