"""Which files ``-f PATH`` names, and their bytes, read with a bound.

The rules are kubectl's for ``apply -f`` with ``-R``, and every failure is an
error, never a silent skip (a policy left out of a CI gate's table is the
worst outcome):

* ``-`` is standard input (once); ``""`` is an error.
* A file named explicitly is read whatever its name, as is a pipe
  (``-f <(helm template ...)``) or a device; reading stops after
  :data:`MAX_FILE_BYTES` + 1 bytes, so ``-f /dev/zero`` is refused at once.
* A directory is walked recursively, in sorted path order; files ending in
  ``.yaml``, ``.yml`` or ``.json`` are read, others ignored.  Symbolic links to
  files are followed (read as the file they point to); symbolic links to
  directories are not descended (as ``kubectl -R``, which uses Go's
  ``filepath.Walk``), so a walk cannot loop.  A subdirectory that cannot be
  listed, a matching name that cannot be read, a dangling link or a matching
  entry that is not a regular file (a FIFO would block the walk) is an error.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .decode import clip

MAX_FILE_BYTES = 3 * 1024 * 1024
"""Per file: the API server's request size limit (3 MiB); larger is refused unread."""

SUFFIXES = (".yaml", ".yml", ".json")
STDIN = "-"


class FileError(Exception):
    """A path that cannot be read; the message is one line and names it (escaped)."""


@dataclass(frozen=True)
class Input:
    """One file's bytes and its name as shown in messages (escaped and clipped)."""

    name: str
    data: bytes


def shown_path(path: str) -> str:
    """A path as it may appear in a message: control, bidi and format characters
    escaped, at most :data:`~.decode.MAX_SHOWN` characters."""
    return clip(path)


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _read_bounded(fh: BinaryIO, name: str) -> bytes:
    data = fh.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise FileError(f"{name}: larger than {MAX_FILE_BYTES} bytes (the API server's "
                        "request limit); not read further")
    return data


def _read_file(path: str) -> Input:
    name = shown_path(path)
    try:
        with open(path, "rb") as fh:
            return Input(name, _read_bounded(fh, name))
    except IsADirectoryError as exc:
        raise FileError(f"{name}: is a directory") from exc
    except OSError as exc:
        raise FileError(f"{name}: cannot read: {_reason(exc)}") from exc


def _walk(top: str) -> Iterator[str]:
    """Matching paths under directory ``top``, sorted like ``sorted(Path.rglob)``."""
    found: list[tuple[tuple[str, ...], str]] = []
    pending = [top]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as exc:
            raise FileError(f"{shown_path(directory)}: cannot list directory: "
                            f"{_reason(exc)}") from exc
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                    continue
                if not entry.name.endswith(SUFFIXES):
                    continue
                mode = os.stat(entry.path).st_mode  # follows a link to a file
            except OSError as exc:
                raise FileError(f"{shown_path(entry.path)}: cannot read: "
                                f"{_reason(exc)}") from exc
            if not stat.S_ISREG(mode):
                raise FileError(f"{shown_path(entry.path)}: not a regular file")
            found.append((tuple(os.path.relpath(entry.path, top).split(os.sep)), entry.path))
    yield from (path for _, path in sorted(found))


def read_inputs(paths: list[str], stdin: BinaryIO | None = None) -> Iterator[Input]:
    """The files ``paths`` name, in order, each read whole but bounded.

    Raises :class:`FileError` at the first path that cannot be read.
    """
    used_stdin = False
    for path in paths:
        if path == "":
            raise FileError("-f: empty path (use . for the current directory)")
        if path == STDIN:
            if used_stdin:
                raise FileError("-f -: standard input given twice")
            used_stdin = True
            yield Input("<stdin>", _read_bounded(stdin or sys.stdin.buffer, "<stdin>"))
            continue
        try:
            is_dir = stat.S_ISDIR(os.stat(path).st_mode)
        except OSError as exc:
            reason = "no such file or directory" if isinstance(exc, FileNotFoundError) \
                else _reason(exc)
            raise FileError(f"{shown_path(path)}: {reason}") from exc
        except ValueError as exc:  # an embedded NUL
            raise FileError(f"{shown_path(path)}: not a valid path") from exc
        if is_dir:
            for file in _walk(path):
                yield _read_file(file)
        else:
            yield _read_file(path)
