"""``mailtls discover`` and ``mailtls explain``: discovery offline, on the operator's path.

``discover DOMAIN…`` runs the operator's discovery round (:class:`Discoverer`)
and the operator's renderer over its entries, and prints on stdout exactly the
``KEY VALUE`` lines the operator would write for those domains; explanations
go to stderr.  Exit 0: every domain decided; 1: a lookup failed; 2: bad
arguments.  ``explain KEY -f FILES…`` replays the one precedence rule over
the policies in the files (and the discovery objects there, looked up live)
and says which object produced the key's line, from which source, and what
it beat.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..discovery.decide import SOURCES, DomainState
from ..discovery.entries import DomainInvalid, domain_keys, entries
from ..discovery.report import describe
from ..loader import clip, shown_path
from ..render import REVISION_KEY, render
from .argtypes import bounded_float

EXIT_OK, EXIT_LOOKUP, EXIT_INVALID = 0, 1, 2


MAX_CA_FILE_BYTES = 16 * 1024 * 1024


def check_ca_file(path: str) -> str | None:
    """Why ``path`` cannot be the ``--ca-file`` (a readable regular file of PEM
    certificates), or None.  ``/dev/null`` or a directory is told as such, not as
    "no such file"; a huge or endless file is refused before it is read."""
    name = shown_path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{name}: no such file"
    except (OSError, ValueError) as exc:
        return f"{name}: {getattr(exc, 'strerror', None) or 'not a valid path'}"
    if not stat.S_ISREG(st.st_mode):
        return f"{name}: not a regular file"
    if st.st_size > MAX_CA_FILE_BYTES:
        return f"{name}: larger than {MAX_CA_FILE_BYTES} bytes"
    try:
        with open(path, "rb") as fh:
            pem = fh.read(MAX_CA_FILE_BYTES + 1)
    except OSError as exc:
        return f"{name}: cannot read: {exc.strerror or type(exc).__name__}"
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        return f"{name}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it"
    return None


def _discoverer(args: argparse.Namespace) -> Any:
    """The same :class:`Discoverer` the operator builds, from the CLI options (or exit 2)."""
    from ..discovery.engine import build_discoverer

    if args.ca_file is not None and (why := check_ca_file(args.ca_file)):
        raise SystemExit(_bad(f"--ca-file: {why}"))
    try:
        return build_discoverer(args.nameserver, args.ca_file, args.timeout)
    except ValueError as exc:
        raise SystemExit(_bad(f"--nameserver: {exc}")) from exc
    except OSError as exc:  # ssl: a PEM block OpenSSL cannot load
        raise SystemExit(_bad(f"--ca-file: {shown_path(args.ca_file or '')}: "
                              f"{clip(str(exc), 200)}")) from exc


def _bad(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_INVALID


def table_lines(states: list[DomainState], now: datetime) -> list[str]:
    """The ``KEY VALUE`` lines the operator's renderer writes for these states."""
    tables = render(entries(states), now=now)
    return [f"{k} {v}" for k, v in tables.tls_entries.items() if k != REVISION_KEY]


def cmd_discover(args: argparse.Namespace) -> int:
    for domain in args.domain:
        try:
            domain_keys(domain)
        except DomainInvalid as exc:
            return _bad(str(exc))
    if args.config_dir is not None and not Path(args.config_dir, "main.cf").is_file():
        return _bad(f"--config-dir: {shown_path(args.config_dir)}/main.cf: no such file")
    discoverer = _discoverer(args)
    now = datetime.now(UTC)
    states = asyncio.run(discoverer.discover_all(args.domain, now, args.source or SOURCES))
    for state in states:
        for line in describe(state):
            print(line, file=sys.stderr)
    if args.probe:
        status = _probe_testing(discoverer, states, args.config_dir)
        if status:
            return status
    for line in table_lines(states, now):
        print(line)
    return EXIT_OK if all(s.decided for s in states) else EXIT_LOOKUP


def _probe_testing(discoverer: Any, states: list[DomainState], config_dir: str | None) -> int:
    """``--probe``: testing-mode domains probed with posttls-finger on this machine."""
    import shutil

    from .. import probe
    from ..discovery.probing import probe_testing
    from .probe import LOCAL, SBIN_PATH, HostRunner, _config_dir

    if shutil.which(probe.PROGRAM, path=SBIN_PATH) is None:
        print(f"error: --probe: {probe.PROGRAM} not found (install Postfix)", file=sys.stderr)
        return EXIT_INVALID

    async def run(config: str | None) -> None:
        runner = HostRunner(config)
        defaults = await probe.read_client_defaults(runner, LOCAL)
        for state in states:
            verdict = await probe_testing(discoverer, state, runner, LOCAL, defaults)
            if verdict is not None:
                print(verdict.line(), file=sys.stderr)

    with _config_dir(config_dir) as config:
        try:
            asyncio.run(run(config))
        except probe.ProbeSetupError as exc:
            return _bad(f"--probe: cannot read the Postfix configuration: {exc}")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from ..discovery.explain import explain
    from ..discovery.objects import DiscoveryInvalid, load_explain_inputs

    if args.ca_file is not None and (why := check_ca_file(args.ca_file)):
        return _bad(f"--ca-file: {why}")  # told now, not only when a lookup needs it
    now = datetime.now(UTC)
    try:
        policies, discoveries = load_explain_inputs(args.file, now)
    except DiscoveryInvalid as exc:
        return _bad(str(exc))
    key = args.key.lower().rstrip(".")
    wanted = [d for d in discoveries if d.covers(key)]
    status = EXIT_OK
    if wanted:
        discoverer = _discoverer(args)
        for obj in wanted:
            states = asyncio.run(discoverer.discover_all(obj.domains_for(key), now,
                                                         obj.sources))
            for state in states:
                for line in describe(state):
                    print(line, file=sys.stderr)
                status = status if state.decided else EXIT_LOOKUP
            policies.extend(obj.entries(states))
    try:
        _, notes = explain(args.key, policies, now=now)
    except ValueError as exc:
        return _bad(str(exc))
    for note in notes:
        print(note)
    return status


def _add_lookup_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nameserver", metavar="HOST[:PORT]",
                   help="ask this DNS server (default: the system resolver); DANE needs it "
                        "to validate DNSSEC (AD bit)")
    p.add_argument("--ca-file", metavar="FILE",
                   help="trust these CA certificates for the MTA-STS HTTPS fetch "
                        "(default: the system store)")
    p.add_argument("--timeout", type=bounded_float(0, 300, low_open=True), default=5.0,
                   metavar="SECONDS",
                   help="per DNS lookup (default: %(default)g)")


def add_discover_parsers(sub: Any) -> None:
    """Register ``discover`` and ``explain`` on the ``mailtls`` subcommand parser."""
    p = sub.add_parser(
        "discover", help="look up domains' MTA-STS and DANE policies and print their lines",
        description="Look up each domain's DANE (TLSA under DNSSEC) and MTA-STS (RFC 8461) "
                    "policy like the operator does, and print on stdout the TLS policy "
                    "table lines it would write (none for a domain without a policy); "
                    "explanations on stderr.",
        epilog="Exit status: 0 decided for every domain, 1 a lookup failed, 2 bad arguments.")
    p.add_argument("domain", nargs="+", metavar="DOMAIN", help="recipient domain")
    p.add_argument("--source", action="append", choices=SOURCES,
                   help="only this source (repeatable; default: both)")
    p.add_argument("--probe", action="store_true",
                   help="probe testing-mode MTA-STS domains with posttls-finger from this "
                        "machine (their MX hosts, port 25): would the line pass if enforced?")
    p.add_argument("--config-dir", metavar="DIR",
                   help="with --probe: the Postfix configuration posttls-finger reads "
                        "(default: /etc/postfix, else Postfix's built-in defaults)")
    _add_lookup_options(p)
    p.set_defaults(func=cmd_discover)

    p = sub.add_parser(
        "explain", help="which object produced a key's line, from which source, what it beat",
        description="Replay the operator's precedence rule (break-glass exception > explicit "
                    "policy > DANE > MTA-STS, then strength, then age) over the MailTLSPolicy "
                    "and MailTLSDiscovery objects in the files; discovery objects naming the "
                    "key are looked up live.",
        epilog="Exit status: 0 explained, 1 a lookup failed, 2 bad input.")
    p.add_argument("key", metavar="KEY", help="a table key (next-hop), e.g. example.com")
    p.add_argument("-f", "--file", action="append", required=True, metavar="PATH",
                   help="YAML/JSON file, directory (recursive) or - for standard input; "
                        "repeatable")
    _add_lookup_options(p)
    p.set_defaults(func=cmd_explain)
