"""The ``mailtls`` command: run the operator, or render / validate / probe offline.

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
from datetime import UTC, datetime, timedelta

from . import __version__
from .policy import DEFAULT_MAX_EXCEPTION, Policy, PolicyInvalid, load_policy
from .render import render
from .sources import Source, SourceError, read_policies

EXIT_INVALID = 2


def _load_all(sources: list[Source], now: datetime, max_exception: timedelta
              ) -> tuple[list[Policy], list[str], dict[str, str]]:
    """The valid policies, one error line per refusal, and the file of each policy."""
    policies: list[Policy] = []
    errors: list[str] = []
    seen: dict[str, str] = {}
    for src in sources:
        try:
            policy = load_policy(src.obj, now=now, max_exception=max_exception)
        except PolicyInvalid as exc:
            errors.extend(f"{src.path}: {src.ref}: {err}" for err in exc.errors)
            continue
        if policy.ref in seen:
            errors.append(f"{src.path}: {policy.ref}: metadata.name: Duplicate value: "
                          f"also defined in {seen[policy.ref]}")
            continue
        seen[policy.ref] = src.path
        policies.append(policy)
    return policies, errors, seen


def _offline(args: argparse.Namespace) -> tuple[list[Policy], int]:
    now = args.now or datetime.now(UTC)
    try:
        sources = read_policies(args.file)
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return [], EXIT_INVALID
    policies, errors, files = _load_all(sources, now, timedelta(days=args.max_exception_days))
    # The renderer's own last gate, run here too so `validate` refuses what `render` would.
    refused = render(policies, now=now).refused
    errors += [f"{files[ref]}: {ref}: spec: {why}" for ref, why in sorted(refused.items())]
    for line in errors:
        print(line, file=sys.stderr)
    return policies, EXIT_INVALID if errors else 0


def cmd_validate(args: argparse.Namespace) -> int:
    policies, status = _offline(args)
    if status == 0:
        print(f"{len(policies)} MailTLSPolicy object(s) valid", file=sys.stderr)
    return status


def cmd_render(args: argparse.Namespace) -> int:
    policies, status = _offline(args)
    if status:
        return status
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


def _timestamp(text: str) -> datetime:
    from .policy import parse_time

    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from exc


def _add_offline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--file", action="append", required=True, metavar="PATH",
                   help="YAML/JSON file or directory (recursive); repeatable. Multi-document "
                        "files and List objects are read; kinds other than MailTLSPolicy "
                        "are ignored.")
    p.add_argument("--now", type=_timestamp, default=None, metavar="RFC3339",
                   help="evaluate break-glass exceptions at this time instead of now")
    p.add_argument("--max-exception-days", type=float,
                   default=DEFAULT_MAX_EXCEPTION.total_seconds() / 86400, metavar="DAYS",
                   help="longest break-glass exception accepted (default: %(default)g)")


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
    _add_offline_options(p)
    p.add_argument("--instance", metavar="[NAMESPACE/]NAME",
                   help="only policies that target this Postfix instance (or all instances); "
                        "default: every policy")
    p.add_argument("--table", choices=("tls_policy", "transport"), default="tls_policy",
                   help="which table to print (default: %(default)s)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("validate", help="check policies without rendering",
                       description="Apply the CRD's schema and CEL rules and the model's own "
                                   "checks; one line per error on stderr, exit 2 if any.")
    _add_offline_options(p)
    p.set_defaults(func=cmd_validate)

    from .runner_cli import add_run_parser  # here: keeps kopf off offline paths

    add_run_parser(sub)
    from .probe_cli import add_probe_parser
    add_probe_parser(sub)
    from .agent.cli import add_agent_parser
    add_agent_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
