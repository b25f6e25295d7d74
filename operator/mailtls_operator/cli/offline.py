"""What ``render``, ``validate`` and ``probe`` share: reading policy files offline with
exactly the checks the cluster applies, and the options that say which files and when."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ..crd import KIND
from ..discovery.objects import KIND as DISCOVERY_KIND
from ..discovery.objects import DiscoveryInvalid, load_discovery
from ..policy import DEFAULT_MAX_EXCEPTION, Policy, PolicyInvalid, load_policy, parse_time
from ..render import render
from ..routing import folding_warning
from ..sources import Source, SourceError, read_objects
from .argtypes import bounded_float

EXIT_INVALID = 2
MAX_EXCEPTION_DAYS = bounded_float(0, 3650)
"""--max-exception-days: up to ten years (``timedelta`` and the model stay finite)."""


MAX_LINE = 1000
"""An error line is cut here: the model's messages quote values (escaped), and a value
of a megabyte must not become a megabyte of CI log."""


def capped(line: str) -> str:
    """``line`` (already escaped) cut to :data:`MAX_LINE` characters."""
    return line if len(line) <= MAX_LINE else \
        f"{line[:MAX_LINE]}...[{len(line) - MAX_LINE} more characters]"


def load_all(sources: list[Source], now: datetime, max_exception: timedelta
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


@dataclass(frozen=True)
class Offline:
    """What ``-f`` held: the valid policies, the exit status (0 or :data:`EXIT_INVALID`)
    and how many valid MailTLSDiscovery objects were judged beside them."""

    policies: list[Policy] = field(default_factory=list)
    status: int = 0
    discoveries: int = 0


def load_offline(args: argparse.Namespace) -> Offline:
    """The valid MailTLSPolicy objects of ``-f``, and 0 or :data:`EXIT_INVALID`.

    MailTLSDiscovery objects in the files are judged too (the cluster would refuse an
    invalid one): they make the exit status, though offline they render nothing."""
    now = args.now or datetime.now(UTC)
    try:
        loaded = read_objects(args.file)
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return Offline(status=EXIT_INVALID)
    sources = [Source(item.path, item.obj) for item in loaded if item.kind == KIND]
    policies, errors, files = load_all(sources, now, timedelta(days=args.max_exception_days))
    discoveries = 0
    for item in loaded:
        if item.kind == DISCOVERY_KIND:
            try:
                load_discovery(item.obj)
                discoveries += 1
            except DiscoveryInvalid as exc:
                errors.append(f"{item.path}: {exc}")
    # The renderer's own last gate, run here too so `validate` refuses what `render` would.
    refused = render(policies, now=now).refused
    errors += [f"{files[ref]}: {ref}: spec: {why}" for ref, why in sorted(refused.items())]
    for line in errors:
        print(capped(line), file=sys.stderr)
    for policy in policies:  # offline, Postfix is taken to fold UTF-8 keys (the default)
        folding = folding_warning(policy.keys)
        if folding:
            print(capped(f"warning: {files[policy.ref]}: {policy.ref}: {folding}"),
                  file=sys.stderr)
    return Offline(policies, EXIT_INVALID if errors else 0, discoveries)


def _timestamp(text: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from exc


def add_offline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--file", action="append", required=True, metavar="PATH",
                   help="YAML/JSON file, directory (recursive: *.yaml, *.yml, *.json) or - "
                        "for standard input; repeatable. Multi-document files and List "
                        "objects are read; other groups' kinds are ignored, an unserved "
                        "mailtls.io version or kind is refused. At most 3 MiB per file.")
    p.add_argument("--now", type=_timestamp, default=None, metavar="RFC3339",
                   help="evaluate break-glass exceptions at this time instead of now")
    p.add_argument("--max-exception-days", type=MAX_EXCEPTION_DAYS,
                   default=DEFAULT_MAX_EXCEPTION.total_seconds() / 86400, metavar="DAYS",
                   help="longest break-glass exception accepted (default: %(default)g)")
