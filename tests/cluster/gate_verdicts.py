"""Verdicts of the offline-gate differential test: the real server's (``kubectl apply
--dry-run=server``, batched) and the offline gate's (``mailtls validate``), and the two
named lists that explain a difference between them.

``STRICTER_BY_DESIGN``: the model refuses what the server's schema and CEL cannot express
(docs/validation.md lists the same rules with the same reasons).  A case where the server
accepts and the gate refuses is by design only if *every* error line of the gate is
covered by one of these rules.  The gate is never laxer than the server by design.

``PENDING``: known disagreements in code other engineers are changing right now, each
with its reproducer; the integrator removes an entry once the fix is merged.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from mailtls_operator import cli


class Kubectl(Protocol):
    def __call__(self, *args: str, input: str | None = None, check: bool = True,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]: ...


@dataclass(frozen=True)
class Verdict:
    """Accepted or refused, and what was said (stderr lines naming the file)."""

    accepted: bool
    said: tuple[str, ...] = ()


# ------------------------------------------------------------------------ the server


def server_verdicts(kubectl: Kubectl, files: Sequence[Path], batch: int = 200,
                    parallel: int = 6) -> dict[Path, Verdict]:
    """``kubectl apply --dry-run=server`` on every file, ``batch`` files per call and
    ``parallel`` calls at a time (each object costs kubectl a GET and a POST: the
    round trips, not the server's CPU, are most of the time).

    kubectl goes on after a refused object, prints each accepted object's name on
    stdout and names the file of each refusal on stderr (``error when creating
    "FILE"``, ``error parsing FILE``).  A file is accepted when all its objects are
    printed and it is named in no error, refused when named in an error; any other file
    (kubectl stopped early, or could not be told) is sent again on its own.
    """
    chunks = [list(files[i:i + batch]) for i in range(0, len(files), batch)]
    out: dict[Path, Verdict] = {}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for result in pool.map(lambda chunk: _server_batch(kubectl, chunk), chunks):
            out.update(result)
    return out


def _server_batch(kubectl: Kubectl, chunk: list[Path]) -> dict[Path, Verdict]:
    args = [a for f in chunk for a in ("-f", str(f))]
    proc = kubectl("apply", "--dry-run=server", "-o", "name", *args, check=False,
                   timeout=600)
    printed = set(proc.stdout.split())
    lines = proc.stderr.splitlines()
    out: dict[Path, Verdict] = {}
    for f in chunk:
        said = tuple(ln for ln in lines if _names(ln, f))
        expected = _printed_names(f)
        if said and not (expected and expected <= printed):
            out[f] = Verdict(False, said)
        elif not said and expected and expected <= printed:
            out[f] = Verdict(True)
        else:  # kubectl stopped early, or said something it did not tie to the file
            single = kubectl("apply", "--dry-run=server", "-o", "name", "-f", str(f),
                             check=False, timeout=60)
            out[f] = Verdict(single.returncode == 0, tuple(single.stderr.splitlines()))
    return out


def _printed_names(path: Path) -> set[str]:
    """What ``kubectl apply -o name`` prints for the objects of ``path`` once accepted
    (``mailtlspolicy.mailtls.io/NAME``); empty where the file cannot be read here."""
    try:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except (yaml.YAMLError, UnicodeDecodeError):
        return set()
    names = set()
    for doc in docs:
        if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict):
            return set()
        group = str(doc.get("apiVersion", "")).partition("/")[0]
        names.add(f"{str(doc.get('kind')).lower()}.{group}/{doc['metadata'].get('name')}")
    return names


def _names(line: str, path: Path) -> bool:
    return f'"{path}"' in line or f"{path}:" in line or line.endswith(str(path))


# ------------------------------------------------------------------ the offline gate


@functools.cache
def _parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def offline_verdict_in_process(path: Path, now: str) -> Verdict:
    """``mailtls validate -f PATH --now NOW`` in this process (the bulk: 10,000 files):
    what ``cli.main`` does, with its parser built once (building it was most of the
    time)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        args = _parser().parse_args(["validate", "-f", str(path), "--now", now])
        try:
            code = args.func(args)
        except Exception as exc:  # the CLI would die with a traceback: a verdict of its own
            return Verdict(False, (f"{path}: Traceback: {type(exc).__name__}: {exc}",))
    lines = tuple(ln for ln in err.getvalue().splitlines() if not ln.endswith(" valid"))
    return Verdict(code == 0, lines)


def _refs(path: Path) -> set[str]:
    try:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except (yaml.YAMLError, UnicodeDecodeError):
        return {f"?{path}"}
    return {f"{(d.get('metadata') or {}).get('namespace')}/{(d.get('metadata') or {}).get('name')}"
            for d in docs if isinstance(d, dict) and isinstance(d.get("metadata"), dict)}


def _runs(files: Sequence[Path]) -> list[list[Path]]:
    """Files grouped so that no run holds one object name twice: one ``validate`` run
    judges its files together, and would refuse the second file defining a name."""
    runs: list[tuple[list[Path], set[str]]] = []
    for f in files:
        refs = _refs(f)
        run = next((r for r in runs if not r[1] & refs), None)
        if run is None:
            run = ([], set())
            runs.append(run)
        run[0].append(f)
        run[1].update(refs)
    return [r[0] for r in runs]


def offline_verdicts_cli(mailtls: Path, files: Sequence[Path], now: str
                         ) -> dict[Path, Verdict]:
    """The real CLI (``.venv/bin/mailtls validate``), over groups of files: each error line
    names its file; a file-level error (``error: ...``) sends each file again alone."""
    out: dict[Path, Verdict] = {}
    for run in _runs(files):
        out.update(_cli_run(mailtls, run, now))
    return out


def _cli_run(mailtls: Path, files: Sequence[Path], now: str) -> dict[Path, Verdict]:
    proc = subprocess.run([str(mailtls), "validate", *[a for f in files for a in ("-f", str(f))],
                           "--now", now], capture_output=True, text=True, timeout=300,
                          check=False)
    lines = [ln for ln in proc.stderr.splitlines() if not ln.endswith(" valid")]
    if any(not any(ln.startswith(f"{f}: ") for f in files) for ln in lines):
        out = {}
        for f in files:
            one = subprocess.run([str(mailtls), "validate", "-f", str(f), "--now", now],
                                 capture_output=True, text=True, timeout=60, check=False)
            said = tuple(ln for ln in one.stderr.splitlines() if not ln.endswith(" valid"))
            out[f] = Verdict(one.returncode == 0, said)
        return out
    return {f: Verdict(not any(ln.startswith(f"{f}: ") for ln in lines),
                       tuple(ln for ln in lines if ln.startswith(f"{f}: "))) for f in files}


# ------------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class Rule:
    """A named, reasoned rule: when it covers a difference, and why."""

    name: str
    reason: str
    covers: Callable[[str], bool]
    """For STRICTER_BY_DESIGN: does this gate error line come from the rule?"""


def _field_says(field: str, *needles: str) -> Callable[[str], bool]:
    rx = re.compile(field)

    def covers(line: str) -> bool:
        m = re.match(r"^.*?: [^:]*/[^:]*: (spec[^:]*): (.*)$", line)
        return bool(m and rx.fullmatch(m.group(1)) and any(n in m.group(2) for n in needles))
    return covers


STRICTER_BY_DESIGN: tuple[Rule, ...] = (
    Rule("host-name-syntax",
         "A destination's host part must be a host name Postfix can match: IDNA 2008 "
         "(UTS 46) for non-ASCII names, LDH labels, no empty label, at most 253 octets as "
         "an A-label. The CRD's pattern admits any non-ASCII character (it cannot do IDNA).",
         _field_says(r"spec\.destinations\[\d+\]", "not a valid host name",
                     "empty host name", "longer than 253")),
    Rule("unsafe-characters",
         "Whitespace, control and format characters (U+2028, U+200B, BOM, ...) never reach "
         "a table key; the CRD's pattern only excludes the ASCII ones.",
         _field_says(r"spec\.destinations\[\d+\]", "a space, control or format character")),
    Rule("duplicate-after-normalisation",
         "Keys equal after lower-casing, trailing-dot removal, NFC and A-label/U-label "
         "mapping are one Postfix key; the server's set only compares the raw strings.",
         _field_says(r"spec\.(destinations|domains)\[\d+\]", "Duplicate value")),
    Rule("port-range",
         "A port is 1-65535 without leading zero; the CRD's pattern allows 1-5 digits.",
         _field_says(r"spec\.destinations\[\d+\]", "must be 1-65535")),
    Rule("ip-literals",
         "[a.b.c.d] must be an IPv4 address and [ipv6:...] an IPv6 address; [.domain] "
         "and .domain:port are not next-hops Postfix looks up.",
         _field_says(r"spec\.destinations\[\d+\]", "not an IPv4 address",
                     "not an IPv6 address", "is not a next-hop", ".domain takes no port")),
    Rule("protocol-once",
         "Postfix refuses a protocol listed twice (>=TLSv1.2:!TLSv1.2); a regular "
         "expression cannot say 'each at most once'.",
         _field_says(r"spec\.protocols", "is listed twice")),
    Rule("exception-window-from-now",
         "A break-glass exception may not end more than --max-exception-days (default 30) "
         "from now; the CRD can only bound expiresAt - startsAt (CEL has no 'now' in "
         "validation rules).",
         _field_says(r"spec\.exception\.expiresAt", "may last at most")),
    Rule("discovery-domain-syntax",
         "A discovered domain must be a valid (IDNA) host name; the pattern cannot say so.",
         _field_says(r"spec\.domains\[\d+\]", "not a valid host name", "empty host name",
                     "longer than 253", "a space, control or format character")),
)


def stricter_by_design(said: Sequence[str]) -> list[str]:
    """The rules that explain every one of the gate's error lines, or [] if some line is
    not explained by any (then the difference is a bug)."""
    names: list[str] = []
    for line in said:
        rule = next((r for r in STRICTER_BY_DESIGN if r.covers(line)), None)
        if rule is None:
            return []
        names.append(rule.name)
    return sorted(set(names))


@dataclass(frozen=True)
class Pending:
    """A known disagreement in code being changed by another branch (not a silent skip:
    the test counts and reports each case it excuses)."""

    name: str
    area: str
    reproducer: str
    matches: Callable[[Any, Verdict, Verdict], bool]
    """(the case, server verdict, offline verdict) -> is this the known case?"""


def _kinds(obj: Any, text: str) -> set[str]:
    if obj is not None:
        return {str(obj.get("kind"))} if isinstance(obj, dict) else set()
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        return set()
    return {str(d.get("kind")) for d in docs if isinstance(d, dict)}


PENDING: tuple[Pending, ...] = ()
"""Empty: the two differences found while the loader was being rewritten (MailTLSDiscovery
objects skipped by ``validate``; go-yaml's ``y``/``n`` booleans) are fixed there."""
