"""``mailtls probe``: the preflight probe (DESIGN.md §10) from the local machine.

Reads MailTLSPolicy files exactly like ``mailtls validate`` (invalid input:
exit 2, nothing on stdout), then probes every destination of every policy
with this machine's ``posttls-finger`` and prints one line per destination::

    mail/partner [mx.partner.example]:25 Fail NoStartTLS: EHLO reply from ... does not ...

The commands run here, not in a pod, through :class:`HostRunner` (the
:class:`~.podrunner.PodRunner` seam with no pod behind it): ``posttls-finger``
and ``postconf`` read ``--config-dir`` (``MAIL_CONFIG``).  Without it the
system configuration is used, or, where this machine has no
``/etc/postfix/main.cf``, an empty temporary one (Postfix's built-in
defaults; said on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import probe
from ..loader import shown_path
from ..podrunner import ExecResult, PodRef, PodRunner, PodRunnerError
from ..policy import Policy
from .argtypes import bounded_float, bounded_int
from .offline import EXIT_INVALID, add_offline_options, load_offline

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_UNAVAILABLE = 3
SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
LOCAL = PodRef("local", "localhost")
"""The "pod" a :class:`HostRunner` stands for: this machine."""

DESCRIPTION = """\
Probe every destination of the given MailTLSPolicy objects from this machine,
the way the operator's preflight/audit probe does from a Postfix pod: run
posttls-finger with each policy's level, match names or digests, trust anchors
(tafile), protocols, cipher grade and SNI, and judge the output against the
level. One line per destination on stdout:

  NAMESPACE/NAME KEY Pass|Fail|Skipped REASON: MESSAGE

Pass reasons: Verified, Encrypted, PlainAllowed. Fail reasons: NoStartTLS,
Untrusted, NameMismatch, FingerprintMismatch, ProtocolMismatch,
HandshakeFailed, Unreachable, Timeout, DNSSECUnavailable, NoTLSARecords,
ConfigError, Error. ".domain" keys are Skipped (NotProbeable). Policies are
validated first, exactly like "mailtls validate".

tafile paths are read on THIS machine: probe where the trust-anchor files
exist, or expect ConfigError. dane/dane-only need smtp_dns_support_level =
dnssec in the configuration (--config-dir); otherwise they fail with
DNSSECUnavailable, as Postfix would not do DANE either.
"""

EPILOG = """\
exit status:
  0  every destination passes its policy (or was skipped)
  1  at least one destination would fail its policy
  2  invalid input: a policy is refused or a file cannot be read (nothing probed)
  3  cannot probe here: posttls-finger or postconf is missing or fails
"""


class HostRunner:
    """A :class:`~.podrunner.PodRunner` that runs argv on this machine (any pod argument).

    No shell; ``MAIL_CONFIG`` is ``config_dir`` when given; stdin is closed
    after writing; a command that outlives ``timeout`` is killed with its
    process group and reported as :class:`PodRunnerError`.
    """

    def __init__(self, config_dir: str | None = None) -> None:
        self.env = {"PATH": SBIN_PATH, "LANG": "C.UTF-8"}
        if config_dir is not None:
            self.env["MAIL_CONFIG"] = config_dir

    async def run(self, pod: PodRef, argv: Sequence[str], *, stdin: bytes | None = None,
                  timeout: float = 60.0) -> ExecResult:
        if not argv:
            raise PodRunnerError("empty argv")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=self.env, start_new_session=True,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            return ExecResult(127, b"", f"{argv[0]}: {exc.strerror}\n".encode())
        try:  # not asyncio.wait_for: see mailtls_operator.aio (a lost cancellation)
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate(stdin)
        except (TimeoutError, asyncio.CancelledError) as exc:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await proc.wait()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise PodRunnerError(f"{argv[0]} did not finish within {timeout:g}s") from None
        assert proc.returncode is not None
        return ExecResult(proc.returncode, out, err)


@contextlib.contextmanager
def _config_dir(given: str | None) -> Iterator[str | None]:
    """The MAIL_CONFIG to use: ``given``, the system's, or a temporary empty main.cf."""
    if given is not None or Path("/etc/postfix/main.cf").exists():
        yield given
        return
    tmp = tempfile.mkdtemp(prefix="mailtls-probe-")
    try:
        (Path(tmp) / "main.cf").write_text("")
        print("note: /etc/postfix/main.cf not found: probing with Postfix's built-in defaults "
              "(use --config-dir to probe with an instance's settings)", file=sys.stderr)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _line(policy: Policy, out: probe.ProbeOutcome) -> str:
    return f"{policy.ref} {out.destination} {out.result} {out.reason}: {out.message}"


async def probe_all(runner: PodRunner, policies: Sequence[Policy], *,
                    concurrency: int, timeouts: probe.ProbeTimeouts,
                    defaults: probe.ClientDefaults) -> list[tuple[Policy, probe.ProbeOutcome]]:
    """Every key of every policy, at most ``concurrency`` probes at a time, in input order."""
    sem = asyncio.Semaphore(concurrency)

    async def one(policy: Policy, key: str) -> tuple[Policy, probe.ProbeOutcome]:
        async with sem:
            return policy, await probe.probe_destination(runner, LOCAL, policy, key,
                                                         timeouts=timeouts, defaults=defaults)

    return list(await asyncio.gather(*(one(p, k) for p in policies for k in p.keys)))


async def _main(args: argparse.Namespace, policies: list[Policy], config_dir: str | None) -> int:
    runner = HostRunner(config_dir)
    try:
        defaults = await probe.read_client_defaults(runner, LOCAL, timeout=30.0)
    except (probe.ProbeSetupError, PodRunnerError) as exc:
        print(f"error: cannot read the Postfix configuration: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    timeouts = probe.ProbeTimeouts(connect=args.timeout, command=args.timeout)
    results = await probe_all(runner, policies, concurrency=args.concurrency,
                              timeouts=timeouts, defaults=defaults)
    failed = 0
    for policy, out in results:
        print(_line(policy, out), flush=True)
        failed += out.failed
    probed = sum(1 for _, o in results if o.result != probe.SKIPPED)
    print(f"{len(results)} destination(s) of {len(policies)} policy(ies): {probed} probed, "
          f"{failed} would fail", file=sys.stderr)
    return EXIT_FAIL if failed else EXIT_OK


def cmd_probe(args: argparse.Namespace) -> int:
    loaded = load_offline(args)  # the same loading and refusal as `validate`
    if loaded.status:
        return loaded.status
    policies = loaded.policies
    if shutil.which(probe.PROGRAM, path=SBIN_PATH) is None:
        print(f"error: {probe.PROGRAM} not found (install Postfix)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.config_dir is not None and not Path(args.config_dir, "main.cf").is_file():
        print(f"error: {shown_path(args.config_dir)}/main.cf: no such file", file=sys.stderr)
        return EXIT_INVALID
    with _config_dir(args.config_dir) as config_dir:
        return asyncio.run(_main(args, policies, config_dir))


def add_probe_parser(sub: Any) -> None:
    """Register ``mailtls probe`` on the ``mailtls`` subcommand parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "probe", help="probe the policies' destinations from this machine (posttls-finger)",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_offline_options(p)
    p.add_argument("--config-dir", metavar="DIR", default=None,
                   help="Postfix configuration directory to probe with (MAIL_CONFIG), e.g. an "
                        "instance's; its smtp_tls_CAfile/CApath, trust anchors, protocols, "
                        "ciphers, SNI and smtp_dns_support_level apply. Default: the system's")
    p.add_argument("--concurrency", type=bounded_int(1, 256), default=4, metavar="N",
                   help="probes in flight at once (default: %(default)s)")
    p.add_argument("--timeout", type=bounded_float(0, 3600, low_open=True), default=10.0,
                   metavar="S",
                   help="connect timeout and per-command timeout of each probe, seconds "
                        "(default: %(default)g)")
    p.set_defaults(func=cmd_probe)
