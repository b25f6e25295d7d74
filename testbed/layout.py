"""A throwaway Postfix instance's directory and configuration (the base of
:class:`~testbed.instance.LocalInstance`).

Layout under ``root``: ``etc/`` (main.cf, master.cf), ``queue/``, ``data/``,
``log/maillog``, ``maps/`` (the TLS policy and transport tables the operator
manages) and ``configmap/`` (what a kubelet would mount from the instance's
ConfigMap).  The configuration follows ``postfix-notes.md``: everything on
loopback, no chroot (except an optional jailed smtp client that reads its own
``/etc/hosts``), ``proxymap`` and ``postlog`` present, mail logged to
``log/maillog``.  ``/etc/postfix`` is never touched; every command gets
``-c etc/`` or ``MAIL_CONFIG``.  ``transport_maps`` is the operator's managed
table first, then the site's own routes (``etc/site_transport``), which a
rollout never overwrites.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self, TypeVar

from mailtls_operator import postfix

from .postfixroot import build_for
from .wait import until

MASTER_EXE = "/usr/lib/postfix/sbin/master"
META_DIRECTORY = Path("/etc/postfix")
SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

T = TypeVar("T")


class PostfixError(RuntimeError):
    """A local Postfix command failed, or Postfix did not do what was awaited in time."""


@dataclass(frozen=True)
class InstanceSettings:
    """How a local instance differs from the defaults.

    ``hosts`` (name -> IPv4) gives the smtp client its own ``/etc/hosts``: the
    smtp service then runs chrooted in the queue directory, where it reads
    ``etc/hosts``, so mail to a *domain* next-hop (the key form a policy
    usually has) reaches a loopback sink without DNS or touching the
    machine's ``/etc/hosts``.  ``smtp_tcp_port`` is the port domain next-hops
    are contacted on (a sink's port).  ``missing_map_types`` builds the
    instance with its own ``meta_directory`` whose ``dynamicmaps.cf`` lacks
    those types: a pod whose image lacks ``postfix-cdb``/``postfix-lmdb``.

    ``routes`` (domain -> ``transport:nexthop``) is the site's own transport
    table (``etc/site_transport``), searched after the operator's managed one:
    the operator rewrites its table on every rollout, so static routing must
    live elsewhere, as in a real deployment.

    ``postfix`` is which Postfix runs the instance: "3.7" (the machine's) or
    "3.10" (Debian trixie's, in its root: see :mod:`testbed.postfixroot`).
    """

    name: str = "pod"
    map_type: str = "lmdb"
    relayhost: str = ""
    smtp_dns_support_level: str = "disabled"
    transport_maps: bool = True
    smtp_verbose: bool = False
    hosts: Mapping[str, str] = field(default_factory=dict)
    smtp_tcp_port: int | None = None
    missing_map_types: tuple[str, ...] = ()
    routes: Mapping[str, str] = field(default_factory=dict)
    extra_main_cf: Mapping[str, str] = field(default_factory=dict)
    postfix: str = "3.7"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's pick, so a high one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], T | None], *, timeout: float, interval: float = 0.02,
               what: str = "condition") -> T:
    """:func:`testbed.wait.until` raising PostfixError at the deadline."""
    return until(predicate, timeout, what, every=interval, error=PostfixError)


class InstanceLayout:
    """One Postfix instance's directory tree and configuration in ``root``."""

    def __init__(self, root: Path | str, settings: InstanceSettings | None = None) -> None:
        self.settings = settings or InstanceSettings()
        postfix.check_map_type(self.settings.map_type)
        self.build = build_for(self.settings.postfix)
        self.root = Path(root).resolve()
        postfix.check_map_path(str(self.root))
        self.etc_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.log_dir = self.root / "log"
        self.map_dir = self.root / "maps"
        self.meta_dir = self.root / "meta"
        self.configmap_dir = self.root / "configmap"
        self.map_path = self.map_dir / "tls_policy"
        self.transport_path = self.map_dir / "transport"
        self.site_transport_path = self.etc_dir / "site_transport"
        self.maillog_path = self.log_dir / "maillog"
        self.syslog_name = f"mailtls-{self.settings.name}-{uuid.uuid4().hex[:6]}"
        self.smtpd_port = 0
        self._created = False
        self._map_dir_locked = False

    # -- configuration -----------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Environment for Postfix commands: this instance's config, a sane PATH."""
        return {"MAIL_CONFIG": str(self.etc_dir), "PATH": SBIN_PATH, "LANG": "C.UTF-8"}

    @property
    def tls_policy_map(self) -> str:
        """``TYPE:PATH`` of the managed TLS policy table."""
        return postfix.map_spec(self.settings.map_type, str(self.map_path))

    @property
    def transport_map(self) -> str:
        """``TYPE:PATH`` of the managed transport table."""
        return postfix.map_spec(self.settings.map_type, str(self.transport_path))

    def transport_tables(self) -> list[str]:
        """transport_maps: the operator's table (if enabled), then the site's routes."""
        tables = [self.transport_map] if self.settings.transport_maps else []
        if self.settings.routes:
            tables.append(postfix.map_spec("hash", str(self.site_transport_path)))
        return tables

    def main_cf(self) -> dict[str, str]:
        """The main.cf parameters of this instance (``extra_main_cf`` wins)."""
        s = self.settings
        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "syslog_name": self.syslog_name,
            "myhostname": f"{s.name}.mailtls.test",
            "mydomain": "mailtls.test",
            "myorigin": "$myhostname",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "local_transport": "error:local delivery disabled",
            "alias_maps": "",
            "alias_database": "",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.log_dir}",
            "smtp_dns_support_level": s.smtp_dns_support_level,
            "relayhost": s.relayhost,
            "smtp_tls_policy_maps": self.tls_policy_map,
            "transport_maps": ", ".join(self.transport_tables()),
            "smtp_tls_loglevel": "1",
            "smtp_connect_timeout": "5s",
            "smtp_helo_timeout": "10s",
            "biff": "no",
        }
        if s.smtp_tcp_port is not None:
            params["smtp_tcp_port"] = str(s.smtp_tcp_port)
        if s.missing_map_types:
            params["meta_directory"] = str(self.meta_dir)
        params.update(s.extra_main_cf)
        return params

    def master_cf(self) -> str:
        """master.cf: chroot ``n`` everywhere (the smtp client ``y`` when ``hosts`` is set)."""
        s = self.settings
        smtp_chroot = "y" if s.hosts else "n"
        smtp_cmd = "smtp -v" if s.smtp_verbose else "smtp"
        rows = [
            f"127.0.0.1:{self.smtpd_port} inet n - n - - smtpd",
            "pickup    unix  n - n 60 1 pickup",
            "cleanup   unix  n - n - 0 cleanup",
            "qmgr      unix  n - n 300 1 qmgr",
            "tlsmgr    unix  - - n 1000? 1 tlsmgr",
            "rewrite   unix  - - n - - trivial-rewrite",
            "bounce    unix  - - n - 0 bounce",
            "defer     unix  - - n - 0 bounce",
            "trace     unix  - - n - 0 bounce",
            "verify    unix  - - n - 1 verify",
            "flush     unix  n - n 1000? 0 flush",
            "proxymap  unix  - - n - - proxymap",
            f"smtp      unix  - - {smtp_chroot} - - {smtp_cmd}",
            f"relay     unix  - - {smtp_chroot} - - {smtp_cmd}",
            "showq     unix  n - n - - showq",
            "error     unix  - - n - - error",
            "retry     unix  - - n - - error",
            "discard   unix  - - n - - discard",
            "anvil     unix  - - n - 1 anvil",
            "scache    unix  - - n - 1 scache",
            "postlog   unix-dgram n - n - 1 postlogd",
            "tlsproxy  unix  - - n - 0 tlsproxy",
        ]
        return "\n".join(rows) + "\n"

    def create(self, *, tls_policy: str = "", transport: str = "") -> Self:
        """Write the directory tree and configuration, and install initial tables.

        The initial tables are what a new pod loads from its ConfigMap at start.
        """
        for d in (self.etc_dir, self.queue_dir, self.data_dir, self.log_dir, self.map_dir,
                  self.configmap_dir):
            d.mkdir(parents=True, exist_ok=True)
        _check_traversable(self.root)
        shutil.chown(self.data_dir, "postfix", "postfix")
        self.data_dir.chmod(0o700)
        if not self.smtpd_port:
            self.smtpd_port = free_port()
        main = "".join(f"{k} = {v}\n" for k, v in self.main_cf().items())
        for name, text in (("main.cf", main), ("master.cf", self.master_cf())):
            path = self.etc_dir / name
            path.write_text(text)
            _age(path)
        if self.settings.missing_map_types:
            self._write_meta_directory()
        if self.settings.hosts:
            self._write_jail()
        self.install_table(self.map_path, tls_policy)
        self.install_table(self.transport_path, transport)
        if self.settings.routes:
            self.site_transport_path.write_text(
                "".join(f"{d} {r}\n" for d, r in self.settings.routes.items()))
            self.run(postfix.postmap_compile("hash", str(self.site_transport_path)))
        self._created = True
        return self

    def _write_meta_directory(self) -> None:
        """A meta_directory whose dynamicmaps.cf lacks ``missing_map_types``."""
        missing = set(self.settings.missing_map_types)
        if self.meta_dir.exists():
            shutil.rmtree(self.meta_dir)
        shutil.copytree(self.build.host_path(META_DIRECTORY), self.meta_dir, symlinks=True,
                        ignore=shutil.ignore_patterns("main.cf", "master.cf", "sasl"))
        dyn = self.meta_dir / "dynamicmaps.cf"
        kept = [ln for ln in dyn.read_text().splitlines(keepends=True)
                if not (ln.split() and ln.split()[0] in missing)]
        dyn.write_text("".join(kept))
        _age(dyn)
        for d in ("dynamicmaps.cf.d", "postfix-files.d"):
            for f in (self.meta_dir / d).glob("*"):
                if f.name.split(".")[0] in missing:
                    f.unlink()

    def _write_jail(self) -> None:
        """``etc/hosts`` (and a files-only nsswitch.conf) for the chrooted smtp client."""
        jail_etc = self.queue_dir / "etc"
        jail_etc.mkdir(exist_ok=True)
        lines = [f"{ip} {name}\n" for name, ip in self.settings.hosts.items()]
        (jail_etc / "hosts").write_text("127.0.0.1 localhost\n" + "".join(lines))
        (jail_etc / "nsswitch.conf").write_text("hosts: files\n")
        for name in ("services", "localtime"):
            src = Path("/etc") / name
            if src.is_file():
                shutil.copyfile(src, jail_etc / name)

    def install_table(self, path: Path, text: str) -> None:
        """Write ``text`` to ``path`` and compile it (setup only; rollouts use the runner)."""
        path.write_text(text, encoding="utf-8")
        if postfix.compiles(self.settings.map_type):
            self.run(postfix.postmap_compile(self.settings.map_type, str(path)))

    # -- commands ------------------------------------------------------------

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as it runs "in the pod": with this instance's Postfix (its root for 3.10,
        where the instance's parent directory is seen at the same path)."""
        return self.build.command(argv, self.root.parent)

    def run(self, argv: Sequence[str], *, stdin: bytes | None = None, check: bool = True,
            timeout: float = 20.0, host: bool = False) -> subprocess.CompletedProcess[bytes]:
        """Run a command against this instance (argv only, MAIL_CONFIG set), with its Postfix;
        ``host``: a test bed tool of the machine (``chattr``), not a pod command."""
        # argv list, no shell: the same commands the operator sends to pods.
        full = list(argv) if host else self.command(argv)
        proc = subprocess.run(full, input=stdin if stdin is not None else b"",  # noqa: S603
                              capture_output=True, env=self.env, cwd=self.root,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise PostfixError(f"{' '.join(argv)}: exit {proc.returncode}: "
                               f"{proc.stderr.decode('utf-8', 'replace').strip()}")
        return proc


def _age(path: Path) -> None:
    """Backdate a config file we just wrote.

    Postfix reads main.cf, master.cf, dynamicmaps.cf (and texthash tables)
    with ``dict_load_file``, which treats a file modified within the last
    second as possibly half-written and re-reads it every 300 ms until it is
    older: ~1.5 s added to every command right after the file was written.
    """
    past = time.time() - 10
    os.utime(path, (past, past))


def _check_traversable(path: Path) -> None:
    """Postfix daemons run as ``mail_owner``: every ancestor must be searchable by others.

    (pytest's ``tmp_path`` is under a 0700 directory: use a 0755 base instead.)
    """
    for d in (path, *path.parents):
        if not d.stat().st_mode & 0o001:
            raise PostfixError(f"{d} is not searchable by the postfix user (mode "
                               f"{d.stat().st_mode & 0o777:o}); put instances under a "
                               "directory every ancestor of which has o+x")
