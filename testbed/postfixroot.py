"""Which Postfix a local instance runs: the machine's 3.7 or Debian trixie's 3.10 in a root.

The machine's Postfix is Debian bookworm's 3.7.  What teams deploy today is
newer (trixie, boky/postfix and Alpine ship 3.10), so the test bed can run an
instance on Debian trixie's Postfix 3.10 too: an ``mmdebstrap`` trixie root
(``postfix postfix-lmdb postfix-cdb ca-certificates``) cached outside the work
tree, and every command of such an instance -- the test bed's own and the
operator's argv through the local runner, as in a pod -- runs inside it::

    unshare -m -- sh -c 'mount --bind DIR ROOT/DIR && exec chroot ROOT "$@"' ... ARGV

A private mount namespace per command, with the instance's parent directory
bound at the same path, so the paths in main.cf, the policy table and the
``tafile`` are the same inside and outside; the network is the machine's
(loopback sinks), nothing is left mounted when the command exits, and the
master it starts keeps its namespace.  Chosen over a podman container per
command: measured ~35 ms per command under load against ~0.5 s for
``podman run``.

The root's ``postfix``/``postdrop`` ids are remapped to the machine's at build
time (the test bed chowns ``data/`` as the machine's ``postfix``), and Debian's
chroot sync at ``postfix start`` is off (``SYNC_CHROOT=""``): it would copy the
machine's ``/etc/hosts`` over the jail the test bed writes.

``python -m testbed.postfixroot ensure`` builds the root when it is missing
(``make system-deps`` calls it); ``MAILTLS_POSTFIX310_ROOT`` overrides where.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

VERSIONS = ("3.7", "3.10")
"""The Postfix versions the test bed runs: the machine's, and Debian trixie's."""

SUITE = "trixie"
PACKAGES = "postfix,postfix-lmdb,postfix-cdb,ca-certificates"
MIRROR = "http://deb.debian.org/debian"
RECIPE = "1"
"""Bump when the recipe below changes: an older root is then rebuilt."""

_STAMP = ".mailtls-root"
_WRAP = 'r=$1 b=$2; shift 2; mount --bind "$b" "$r$b" && exec chroot "$r" "$@"'


def root_dir() -> Path:
    """Where the trixie root lives (outside every work tree, shared by all of them)."""
    env = os.environ.get("MAILTLS_POSTFIX310_ROOT")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "mailtls" / "postfix310" / "root"


@dataclass(frozen=True)
class PostfixBuild:
    """One Postfix: where its files are seen from the machine, how to run its commands."""

    version: str
    root: Path | None  # None: the machine's own Postfix

    def host_path(self, path: str | Path) -> Path:
        """``path`` as the machine sees it (``/proc/PID/exe`` of the master, its cwd)."""
        return Path(path) if self.root is None else Path(f"{self.root}{path}")

    def command(self, argv: Sequence[str], bind: Path) -> list[str]:
        """``argv`` as it must be run for this Postfix, ``bind`` visible at the same path."""
        if self.root is None:
            return list(argv)
        self.host_path(bind).mkdir(parents=True, exist_ok=True)
        return ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", _WRAP,
                "mailtls-postfix-root", str(self.root), str(bind), *argv]

    def forget(self, bind: Path) -> None:
        """Remove the (empty) mount point :meth:`command` made for ``bind``, once nothing
        runs there any more: removing it earlier would detach a live master's bind mount."""
        if self.root is not None:
            with contextlib.suppress(OSError):
                self.host_path(bind).rmdir()

    def unavailable(self) -> str | None:
        """None if this Postfix can run here, else why not (tests skip with it)."""
        if self.root is None:
            return _host_unavailable()
        if os.geteuid() != 0:
            return "running Postfix 3.10 in its root needs root (mount, chroot)"
        if not self.ready():
            return (f"the Postfix 3.10 root is missing at {self.root}: `make system-deps` "
                    "(or `python -m testbed.postfixroot ensure`) builds it with mmdebstrap")
        return None

    def ready(self) -> bool:
        """The root exists and was built by this recipe."""
        if self.root is None:
            return True
        try:
            return (self.root / _STAMP).read_text().strip() == RECIPE
        except OSError:
            return False


def build_for(version: str) -> PostfixBuild:
    """The :class:`PostfixBuild` of ``version`` ("3.7" or "3.10")."""
    if version == "3.7":
        return PostfixBuild("3.7", None)
    if version == "3.10":
        return PostfixBuild("3.10", root_dir())
    raise ValueError(f"unknown Postfix {version!r}: one of {', '.join(VERSIONS)}")


def _host_unavailable() -> str | None:
    for tool in ("postfix", "postmap", "postconf", "postqueue"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin") is None:
            return f"{tool} not installed (make system-deps: postfix postfix-lmdb postfix-cdb)"
    if not Path("/usr/lib/postfix/sbin/master").exists():
        return "Postfix master not found"
    if os.geteuid() != 0:
        return "starting Postfix instances needs root"
    if not any(Path("/usr/lib/postfix").glob("postfix-lmdb.so*")):
        return "postfix-lmdb not installed (make system-deps)"
    return None


# -- building the root ---------------------------------------------------------


def build_root(dest: Path, *, timeout: float = 1200.0) -> None:
    """mmdebstrap the trixie root into ``dest`` (atomically: built beside, then renamed)."""
    if shutil.which("mmdebstrap") is None:
        raise RuntimeError("mmdebstrap is needed to build the Postfix 3.10 root "
                           "(apt-get install mmdebstrap)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".building")
    old = dest.with_name(dest.name + ".old")
    for d in (tmp, old):
        if d.exists():
            shutil.rmtree(d)
    proc = subprocess.run(  # noqa: S603 - constant argv
        ["mmdebstrap", "--quiet", "--variant=minbase", "--mode=root",
         f"--include={PACKAGES}", SUITE, str(tmp), MIRROR],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"mmdebstrap {SUITE} failed (exit {proc.returncode}): "
                           f"{proc.stderr.decode('utf-8', 'replace')[-2000:]}")
    _remap_ids(tmp)
    # Debian's postfix-script syncs /etc files into the queue directory at every start;
    # the test bed writes its own jail (etc/hosts) there, which the sync would replace.
    (tmp / "etc" / "default" / "postfix").write_text('SYNC_CHROOT=""\n')
    (tmp / _STAMP).write_text(RECIPE + "\n")
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def _ids(root: Path, name: str, db: str) -> int:
    for line in (root / "etc" / db).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise RuntimeError(f"{name} not in {root}/etc/{db}")


def _remap_ids(root: Path) -> None:
    """Give the root's postfix user and postfix/postdrop groups the machine's ids."""
    uids = {_ids(root, "postfix", "passwd"): pwd.getpwnam("postfix").pw_uid}
    gids = {_ids(root, g, "group"): grp.getgrnam(g).gr_gid for g in ("postfix", "postdrop")}
    todo = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_uid in uids or st.st_gid in gids:
                todo.append((path, st))
    for path, st in todo:  # one pass over the old ids: no chain through a reused id
        os.lchown(path, uids.get(st.st_uid, st.st_uid), gids.get(st.st_gid, st.st_gid))
        if not os.path.islink(path):
            os.chmod(path, st.st_mode & 0o7777)  # chown cleared the setgid bit of postdrop
    for db, ids, names in (("passwd", uids, ("postfix",)),
                           ("group", gids, ("postfix", "postdrop"))):
        db_path = root / "etc" / db
        lines = []
        for line in db_path.read_text().splitlines():
            f = line.split(":")
            if f[0] in names:
                f[2] = str(ids[int(f[2])])
                if db == "passwd":
                    f[3] = str(grp.getgrnam("postfix").gr_gid)
            lines.append(":".join(f))
        db_path.write_text("\n".join(lines) + "\n")


def ensure(out: TextIO = sys.stderr) -> int:
    """Build the root if missing or stale; print progress.  Exit status for ``make``."""
    build = build_for("3.10")
    assert build.root is not None
    if build.ready():
        print(f"postfix 3.10: root ready at {build.root}", file=out)
        return 0
    print(f"postfix 3.10: building the Debian {SUITE} root at {build.root} "
          "(mmdebstrap, a few minutes)...", file=out, flush=True)
    start = time.monotonic()
    try:
        build_root(build.root)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"postfix 3.10: cannot build the root: {exc}", file=out)
        return 1
    print(f"postfix 3.10: root built in {time.monotonic() - start:.0f} s", file=out)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["ensure"]:
        print("usage: python -m testbed.postfixroot ensure", file=sys.stderr)
        sys.exit(2)
    sys.exit(ensure())
