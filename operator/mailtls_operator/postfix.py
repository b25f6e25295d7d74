"""Argv builders for the commands the operator runs inside a Postfix pod.  Pure.

Every command reaches a pod as an argv list through :class:`~.podrunner.PodRunner`;
nothing here is ever joined into a shell string.  The one shell in use,
:func:`write_file`, runs a *constant* script and receives the path as a
positional parameter, and the table content travels on stdin, so no byte of a
policy can become shell syntax.

Everything that varies (map paths, map types, parameter names, queue ids) is
validated here, at the point where it would otherwise become an argument: a
path starting with ``-`` would be an option, a ``:`` in a path would change
what ``TYPE:PATH`` means to Postfix, and whitespace would split a ``postconf``
line.  The builders never add ``-c CONFIG_DIR`` unless asked: in a pod the
configuration is where Postfix expects it, and the local runner sets
``MAIL_CONFIG`` instead, so the argv the tests run is the argv production runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Final

MAP_TYPES: Final = ("lmdb", "cdb", "hash", "texthash")
"""Table types the operator can write (DESIGN.md §3).  ``texthash`` is read as
text by Postfix at process start and cannot be compiled by ``postmap``."""

_DB_SUFFIX: Final = {"lmdb": ".lmdb", "cdb": ".cdb", "hash": ".db", "texthash": ""}

NEW_SUFFIX: Final = ".mailtls-new"
"""Suffix of the staged table next to the live one (same directory, so the
final ``mv`` is a rename(2) on one filesystem: atomic)."""

# Absolute, no empty/dot components, and a conservative character set: these
# paths end up after ``TYPE:`` in Postfix's own syntax and as argv words.
_PATH_RE: Final = re.compile(r"/[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
_MAX_PATH: Final = 1024
_PARAM_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,99}")

# Postfix queue ids (src/global/mail_queue.h).  Short ids: five upper-case hex
# digits of microseconds, then the inode number in upper-case hex.  Long ids
# (enable_long_queue_ids = yes): seconds (>= 6 chars) and microseconds
# (exactly 4) in a base-52 alphabet without vowels, the separator 'z', then
# the inode number in base 51 (the same alphabet without 'z').
_SHORT_QID: Final = re.compile(r"[0-9A-F]{6,32}")
_B52: Final = "0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z"
_B51: Final = "0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-y"
_LONG_QID: Final = re.compile(rf"[{_B52}]{{10,24}}z[{_B51}]{{1,16}}")

WRITE_SCRIPT: Final = 'umask 022 && cat > "$1" && wc -c < "$1"'
"""The constant script behind :func:`write_file`.  ``umask 022``: smtp(8) opens
its tables as root before dropping privileges (measured: a 0600 lmdb table is
honoured), but a table behind ``proxy:`` is opened on demand by proxymap(8)
as ``mail_owner``, and a policy table is no secret; an exec session's umask
is not ours to trust.  It prints the byte count written, so a stdin cut short
by the transport is detected before ``postmap`` compiles half a table."""


class InvalidArgument(ValueError):
    """A value that must never become a command argument."""


def check_map_type(map_type: str) -> str:
    """Return ``map_type`` if the operator supports it, else raise."""
    if map_type not in MAP_TYPES:
        raise InvalidArgument(
            f"unsupported map type {map_type!r}: expected one of {', '.join(MAP_TYPES)}")
    return map_type


def check_map_path(path: str) -> str:
    """Return ``path`` if it is an absolute path made only of safe characters.

    Refused: relative paths, ``.``/``..``/empty components, a trailing slash,
    and any character outside ``A-Za-z0-9._-`` (no whitespace, ``:``, ``,``,
    ``$``, quotes or control characters that Postfix or a shell could read
    as syntax).
    """
    if len(path) > _MAX_PATH or not _PATH_RE.fullmatch(path):
        raise InvalidArgument(f"unsafe map path {path!r}: must be absolute, characters "
                              "A-Za-z0-9._- only")
    if any(part in {".", ".."} for part in path.split("/")):
        raise InvalidArgument(f"unsafe map path {path!r}: '.' and '..' are not allowed")
    return path


def check_param(name: str) -> str:
    """Return a main.cf parameter name if it has Postfix's parameter syntax."""
    if not _PARAM_RE.fullmatch(name):
        raise InvalidArgument(f"not a Postfix parameter name: {name!r}")
    return name


def check_queue_id(queue_id: str) -> str:
    """Return ``queue_id`` if it is a Postfix short or long queue id, else raise."""
    if not (_SHORT_QID.fullmatch(queue_id) or _LONG_QID.fullmatch(queue_id)):
        raise InvalidArgument(f"not a Postfix queue id: {queue_id!r}")
    return queue_id


def db_suffix(map_type: str) -> str:
    """The suffix ``postmap`` appends to the compiled database (``""`` for texthash)."""
    return _DB_SUFFIX[check_map_type(map_type)]


def db_path(map_type: str, path: str) -> str:
    """The file Postfix actually reads for ``TYPE:PATH``."""
    return check_map_path(path) + db_suffix(map_type)


def compiles(map_type: str) -> bool:
    """Whether ``postmap`` builds a database for this type (texthash: no)."""
    return db_suffix(map_type) != ""


def map_spec(map_type: str, path: str) -> str:
    """``TYPE:PATH`` as Postfix names a table."""
    return f"{check_map_type(map_type)}:{check_map_path(path)}"


def _config(config_dir: str | None) -> list[str]:
    return [] if config_dir is None else ["-c", check_map_path(config_dir)]


def postmap_compile(map_type: str, path: str, *, config_dir: str | None = None) -> list[str]:
    """``postmap TYPE:PATH``: compile the text at PATH into PATH + suffix."""
    if not compiles(map_type):
        raise InvalidArgument(f"{map_type} tables are read as text; postmap cannot build them")
    return ["postmap", *_config(config_dir), map_spec(map_type, path)]


def postmap_query(key: str, map_type: str, path: str, *,
                  config_dir: str | None = None) -> list[str]:
    """``postmap -q KEY TYPE:PATH``: exit 0 and the value on a hit, exit 1 on a miss.

    The key is one argv word after ``-q``, so it cannot be read as an option;
    it must still be a single table key (no whitespace, no control character).
    """
    if not key or key == "-" or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in key):
        raise InvalidArgument(f"not a table key: {key!r}")
    return ["postmap", *_config(config_dir), "-q", key, map_spec(map_type, path)]


def postmap_query_stdin(map_type: str, path: str, *, config_dir: str | None = None) -> list[str]:
    """``postmap -q - TYPE:PATH``: keys on stdin, ``KEY<TAB>VALUE`` for each hit."""
    return ["postmap", *_config(config_dir), "-q", "-", map_spec(map_type, path)]


def postmap_dump(map_type: str, path: str, *, config_dir: str | None = None) -> list[str]:
    """``postmap -s TYPE:PATH``: every entry, ``KEY`` whitespace ``VALUE`` (the agent reads
    the site's transport routes with it to attribute TLSRPT reports)."""
    return ["postmap", *_config(config_dir), "-s", map_spec(map_type, path)]


def postfix_reload(*, config_dir: str | None = None) -> list[str]:
    """``postfix reload``: re-read main.cf and restart processes gracefully."""
    return ["postfix", *_config(config_dir), "reload"]


INSTANCE_PARAMS: Final = ("relayhost", "transport_maps", "smtp_tls_policy_maps",
                          "smtp_dns_support_level")


def postconf_get(params: Iterable[str] = INSTANCE_PARAMS, *,
                 config_dir: str | None = None) -> list[str]:
    """``postconf -x NAME...``: effective values, ``$name`` references expanded.

    Not ``-h``: with ``-h`` an unknown parameter (older Postfix) is dropped
    with only a warning and every later value shifts one line up; the
    ``name = value`` form says which value is which.  Parse with
    :func:`parse_postconf`.
    """
    names = [check_param(p) for p in params]
    if not names:
        raise InvalidArgument("postconf_get needs at least one parameter")
    return ["postconf", *_config(config_dir), "-x", *names]


def parse_postconf(output: str) -> dict[str, str]:
    """``name = value`` lines from :func:`postconf_get` as a dict."""
    values: dict[str, str] = {}
    for line in output.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            values[name.strip()] = value.strip()
    return values


def postqueue_json(*, config_dir: str | None = None) -> list[str]:
    """``postqueue -j``: the queue as JSON objects, one per line."""
    return ["postqueue", *_config(config_dir), "-j"]


def postqueue_schedule(queue_id: str, *, config_dir: str | None = None) -> list[str]:
    """``postqueue -i ID``: deliver one deferred message now."""
    return ["postqueue", *_config(config_dir), "-i", check_queue_id(queue_id)]


def postqueue_flush(*, config_dir: str | None = None) -> list[str]:
    """``postqueue -f``: retry all deferred mail now (also unthrottles dead sites)."""
    return ["postqueue", *_config(config_dir), "-f"]


def write_file(path: str) -> list[str]:
    """Write stdin to ``path`` (mode 0644); stdout is the number of bytes written.

    ``sh`` is always there (postfix-script is a shell script); the script is a
    constant and ``path`` arrives as ``$1``.
    """
    return ["sh", "-c", WRITE_SCRIPT, "mailtls-write", check_map_path(path)]


def copy_file(src: str, dst: str) -> list[str]:
    """``cp SRC DST``: the stdin-free way to stage a table (from a mounted ConfigMap).

    ``/dev/null`` is allowed as ``src`` to stage an empty table.
    """
    return ["cp", "--", check_map_path(src), check_map_path(dst)]


def sha256_file(path: str) -> list[str]:
    """``sha256sum PATH``: proves a copied table is byte-for-byte the rendered one."""
    return ["sha256sum", "--", check_map_path(path)]


def move(src: str, dst: str) -> list[str]:
    """``mv -f SRC DST``: rename(2) within one directory, so readers see old or new."""
    return ["mv", "-f", "--", check_map_path(src), check_map_path(dst)]


def remove(paths: Sequence[str]) -> list[str]:
    """``rm -f PATH...``: drop staged files after a failed step."""
    return ["rm", "-f", "--", *(check_map_path(p) for p in paths)]


def queue_id_from_reply(reply: str) -> str | None:
    """The queue id in smtpd's ``250 2.0.0 Ok: queued as ID`` reply, if any."""
    m = re.search(r"queued as ([0-9A-Za-z]+)", reply)
    if m is None:
        return None
    try:
        return check_queue_id(m.group(1))
    except InvalidArgument:
        return None


def readable_by(path: str, user: str = "postfix") -> list[str]:
    """``test -r PATH`` as ``user`` (util-linux ``setpriv``, no PAM, no shell): smtp(8) opens
    a ``tafile`` after dropping to ``mail_owner``, so root being able to read it proves
    nothing.  Exit 0 readable, 1 with empty stderr not readable; anything else: no verdict."""
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user):
        raise InvalidArgument(f"not a user name: {user!r}")
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--",
            "test", "-r", check_map_path(path)]
