"""``mailtls render | validate`` and the ``mailtls`` parser (``run``: :mod:`.run`,
``probe``: :mod:`.probe`).

``render`` and ``validate`` apply exactly the checks the cluster applies (the
CRD's schema and CEL rules, then the model's own), so a CI pipeline can refuse
a bad policy before it is merged.  Exit status 2 means "refused": nothing is
printed on stdout then, and each error is one line on stderr naming the file,
the object and the field.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from .. import __version__
from ..loader import clip
from ..render import render
from .offline import EXIT_INVALID, add_offline_options, load_offline
from .probe import add_probe_parser
from .run import add_run_parser


def cmd_validate(args: argparse.Namespace) -> int:
    loaded = load_offline(args)
    if loaded.status == 0:
        found = loaded.discoveries
        also = f", {found} MailTLSDiscovery object(s)" if found else ""
        print(f"{len(loaded.policies)} MailTLSPolicy object(s){also} valid", file=sys.stderr)
    return loaded.status


def cmd_render(args: argparse.Namespace) -> int:
    loaded = load_offline(args)
    if loaded.status:
        return loaded.status
    policies = loaded.policies
    namespace, _, name = args.instance.rpartition("/") if args.instance else ("", "", "")
    if name:
        policies = [p for p in policies
                    if p.targets(name) and (not namespace or p.namespace == namespace)]
    tables = render(policies, now=args.now or datetime.now(UTC))
    if tables.refused:  # cannot happen after _offline's check; never write a partial table
        return EXIT_INVALID
    for ref, losses in sorted(tables.losses.items()):
        for loss in losses:
            print(f"warning: {ref}: {loss.key}: {loss.reason}: {loss.winner} wins this key",
                  file=sys.stderr)
    sys.stdout.write(tables.tls_policy if args.table == "tls_policy" else tables.transport)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailtls",
        description="Declarative Postfix TLS policy (smtp_tls_policy_maps) for Kubernetes: "
                    "run the operator, or check and render MailTLSPolicy files offline.",
        epilog="Exit status: 0 success, 1 failure, 2 invalid input (nothing on stdout).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("render", help="print the Postfix table the policies produce",
                       description="Validate the policies like the cluster does and print "
                                   "the TLS policy table (or the transport table) on stdout. "
                                   "Conflicts are warnings on stderr (exit 0).")
    add_offline_options(p)
    p.add_argument("--instance", metavar="[NAMESPACE/]NAME",
                   help="only policies that target this Postfix instance (or all instances); "
                        "default: every policy")
    p.add_argument("--table", choices=("tls_policy", "transport"), default="tls_policy",
                   help="which table to print (default: %(default)s)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("validate", help="check policies without rendering",
                       description="Apply the CRD's schema and CEL rules and the model's own "
                                   "checks; one line per error on stderr, exit 2 if any.")
    add_offline_options(p)
    p.set_defaults(func=cmd_validate)

    add_run_parser(sub)
    add_probe_parser(sub)
    from .discover import add_discover_parsers  # discover, explain (issue 16)
    add_discover_parsers(sub)
    from ..agent.cli import add_agent_parser
    add_agent_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run" or args.command == "agent":  # long-running: their own handling
        status: int = args.func(args)
        return status
    try:
        status = args.func(args)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except RecursionError:
        print("error: input nested too deeply", file=sys.stderr)
        return EXIT_INVALID
    except Exception as exc:  # a safety net only: each known failure is handled where it
        # arises; an unknown one is still one line and exit 2, never a traceback
        print(f"error: unexpected {type(exc).__name__}: {clip(str(exc), 200)}",
              file=sys.stderr)
        return EXIT_INVALID
    return status


if __name__ == "__main__":
    sys.exit(main())
