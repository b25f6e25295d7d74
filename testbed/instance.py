"""A throwaway Postfix instance in one directory: the local stand-in for a Postfix pod.

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

Synchronous on purpose: usable from pytest fixtures, from async tests
(briefly blocking is fine, the sinks and Postfix run elsewhere) and from the
``make demo`` script.  Stopping is reliable: the master is identified by its
pid file, ``/proc/PID/exe`` and ``/proc/PID/cwd`` before its process group is
signalled, so nothing else on the machine can be hit and nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from pathlib import Path
from typing import Any, Self, TypeVar

from mailtls_operator import postfix

MASTER_EXE = "/usr/lib/postfix/sbin/master"
META_DIRECTORY = Path("/etc/postfix")
SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

T = TypeVar("T")

_DELIVERY_RE = re.compile(
    r"(?P<qid>[0-9A-Za-z]+): to=<(?P<rcpt>[^>]*)>,(?: orig_to=<[^>]*>,)?"
    r" relay=(?P<relay>[^,]*),.*? dsn=(?P<dsn>[0-9.]+), status=(?P<status>\w+)"
    r" \((?P<reason>.*)\)$")


class PostfixError(RuntimeError):
    """A local Postfix command failed, or Postfix did not do what was awaited in time."""


@dataclass(frozen=True)
class Delivery:
    """One delivery attempt of one recipient, as the maillog reports it."""

    queue_id: str
    recipient: str
    relay: str
    dsn: str
    status: str  # sent | deferred | bounced | expired
    reason: str
    line: str


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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's pick, so a high one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], T | None], *, timeout: float, interval: float = 0.02,
               what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; raise PostfixError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise PostfixError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


class LocalInstance:
    """One Postfix instance in ``root``; see the module docstring."""

    def __init__(self, root: Path | str, settings: InstanceSettings | None = None) -> None:
        self.settings = settings or InstanceSettings()
        postfix.check_map_type(self.settings.map_type)
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
        shutil.copytree(META_DIRECTORY, self.meta_dir, symlinks=True,
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

    def run(self, argv: Sequence[str], *, stdin: bytes | None = None, check: bool = True,
            timeout: float = 20.0) -> subprocess.CompletedProcess[bytes]:
        """Run a Postfix command against this instance (argv only, MAIL_CONFIG set)."""
        # argv list, no shell: the same commands the operator sends to pods.
        proc = subprocess.run(list(argv), input=stdin if stdin is not None else b"",  # noqa: S603
                              capture_output=True, env=self.env, cwd=self.root,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise PostfixError(f"{' '.join(argv)}: exit {proc.returncode}: "
                               f"{proc.stderr.decode('utf-8', 'replace').strip()}")
        return proc

    def start(self, timeout: float = 15.0) -> Self:
        """Start the master; return once smtpd accepts connections."""
        if not self._created:
            self.create()
        self.run(["postfix", "-c", str(self.etc_dir), "start"], timeout=timeout)
        wait_until(self._smtpd_answers, timeout=timeout, what=f"smtpd on {self.smtpd_port}")
        return self

    def _smtpd_answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.smtpd_port), timeout=0.5):
                return True
        except OSError:
            return False

    def reload(self) -> None:
        """``postfix reload``."""
        self.run(["postfix", "-c", str(self.etc_dir), "reload"])

    def master_pid(self) -> int | None:
        """The pid of *this* instance's running master, or None.

        Trusted only if ``/proc/PID/exe`` is Postfix's master and its working
        directory is this instance's queue directory (the master chdirs there),
        so a stale pid file can never point the stop at another process.
        """
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            if os.readlink(f"/proc/{pid}/exe") != MASTER_EXE:
                return None
            if Path(os.readlink(f"/proc/{pid}/cwd")) != self.queue_dir:
                return None
        except OSError:
            return None
        return pid if _alive(pid) else None

    @property
    def running(self) -> bool:
        return self.master_pid() is not None

    def stop(self, grace: float = 0.3, timeout: float = 5.0) -> None:
        """Stop the instance and everything it started; never leaves a process behind.

        What ``postfix stop`` does (SIGTERM to the master, which terminates
        its process group), without its one-second sleeps and its force-kill
        bug: poll for the group to go, and after ``grace`` seconds SIGKILL what
        is left of the master's process group.  The grace is short on purpose:
        a dying master logs "terminating on signal 15" to postlogd, which it
        has just terminated, and its logger then waits a full second before
        falling back; Postfix's queue is crash-safe, so nothing is lost by
        not waiting.  Also undoes :meth:`lock_map_dir`.
        """
        self.unlock_map_dir()
        pid = self.master_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _group_members(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if _group_members(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            wait_until(lambda: not _group_members(pid), timeout=timeout,
                       what=f"process group {pid} to exit")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def postconf(self, *names: str) -> dict[str, str]:
        """Effective main.cf values (``postconf -x``)."""
        out = self.run(postfix.postconf_get(names)).stdout.decode()
        return postfix.parse_postconf(out)

    def query(self, key: str, table: str = "tls_policy") -> str | None:
        """``postmap -q KEY`` on the live managed table: the value, or None on a miss."""
        path = self.map_path if table == "tls_policy" else self.transport_path
        proc = self.run(postfix.postmap_query(key, self.settings.map_type, str(path)),
                        check=False)
        if proc.returncode == 0:
            return proc.stdout.decode("utf-8").rstrip("\n")
        if proc.stderr.strip():
            raise PostfixError(proc.stderr.decode("utf-8", "replace").strip())
        return None

    # -- failure injection ---------------------------------------------------

    def lock_map_dir(self) -> None:
        """Make ``maps/`` unwritable even for root (``chattr +i``): a read-only volume.

        Raises PostfixError where the filesystem or capabilities do not allow it.
        """
        self.run(["chattr", "+i", str(self.map_dir)])
        self._map_dir_locked = True

    def unlock_map_dir(self) -> None:
        """Undo :meth:`lock_map_dir` (so the directory can be removed)."""
        if self._map_dir_locked:
            self.run(["chattr", "-i", str(self.map_dir)])
            self._map_dir_locked = False

    # -- the ConfigMap a kubelet would mount -------------------------------------

    def publish_configmap(self, tls_policy: str, transport: str | None) -> None:
        """Write ``configmap/`` as a kubelet would (atomic rename per file)."""
        for name, text in (("tls_policy", tls_policy), ("transport", transport)):
            dst = self.configmap_dir / name
            if text is None:
                dst.unlink(missing_ok=True)
                continue
            tmp = self.configmap_dir / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(dst)

    # -- mail ----------------------------------------------------------------

    def submit(self, recipients: str | Sequence[str], *, sender: str = "sender@mailtls.test",
               subject: str = "mailtls test", body: str = "hello\n", smtputf8: bool = False,
               timeout: float = 10.0) -> str:
        """Submit one message to this instance's smtpd; return Postfix's queue id.

        ``smtputf8`` sends ``MAIL FROM ... SMTPUTF8`` (needed for U-label
        addresses): Postfix then looks the TLS policy up with the U-label.
        """
        rcpts = [recipients] if isinstance(recipients, str) else list(recipients)
        msg = EmailMessage()
        msg["From"] = sender
        msg["To"] = ", ".join(rcpts)
        msg["Subject"] = subject
        msg["Message-ID"] = f"<{uuid.uuid4().hex}@mailtls.test>"
        msg.set_content(body)
        data = msg.as_bytes(policy=SMTPUTF8 if smtputf8 else SMTP)
        with smtplib.SMTP("127.0.0.1", self.smtpd_port, timeout=timeout) as smtp:
            smtp.ehlo("client.mailtls.test")
            options = ["SMTPUTF8", "BODY=8BITMIME"] if smtputf8 else []
            code, resp = smtp.mail(sender, options)
            if code != 250:
                raise PostfixError(f"MAIL FROM refused: {code} {resp!r}")
            for rcpt in rcpts:
                code, resp = smtp.rcpt(rcpt)
                if code not in (250, 251):
                    raise PostfixError(f"RCPT TO:<{rcpt}> refused: {code} {resp!r}")
            code, resp = smtp.data(data)
            if code != 250:
                raise PostfixError(f"DATA refused: {code} {resp!r}")
        qid = postfix.queue_id_from_reply(resp.decode("utf-8", "replace"))
        if qid is None:
            raise PostfixError(f"no queue id in {resp!r}")
        return qid

    def maillog(self) -> str:
        """Everything this instance logged so far."""
        try:
            return self.maillog_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def deliveries(self, queue_id: str | None = None) -> list[Delivery]:
        """Delivery attempts in log order (of one message if ``queue_id`` is given)."""
        out = []
        for line in self.maillog().splitlines():
            m = _DELIVERY_RE.search(line)
            if m and (queue_id is None or m.group("qid") == queue_id):
                out.append(Delivery(m.group("qid"), m.group("rcpt"), m.group("relay"),
                                    m.group("dsn"), m.group("status"), m.group("reason"),
                                    line))
        return out

    def wait_for_delivery(self, queue_id: str, *, status: str | Iterable[str] | None = None,
                          timeout: float = 15.0) -> Delivery:
        """The first logged attempt for ``queue_id`` (with ``status``, if given)."""
        wanted = {status} if isinstance(status, str) else set(status or ())

        def found() -> Delivery | None:
            for d in self.deliveries(queue_id):
                if not wanted or d.status in wanted:
                    return d
            return None

        return wait_until(found, timeout=timeout,
                          what=f"delivery of {queue_id} ({'/'.join(sorted(wanted)) or 'any'})")

    def wait_for_log(self, pattern: str, *, timeout: float = 10.0) -> str:
        """The first maillog line matching the regex ``pattern``."""
        rx = re.compile(pattern)

        def found() -> str | None:
            return next((ln for ln in self.maillog().splitlines() if rx.search(ln)), None)

        return wait_until(found, timeout=timeout, what=f"maillog line /{pattern}/")

    def queue(self) -> list[dict[str, Any]]:
        """The queue as ``postqueue -j`` reports it (one dict per message)."""
        out = self.run(postfix.postqueue_json()).stdout.decode("utf-8", "replace")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        """``postqueue -f``: retry deferred mail now."""
        self.run(postfix.postqueue_flush())

    def schedule(self, queue_id: str) -> None:
        """``postqueue -i ID``: retry one message now."""
        self.run(postfix.postqueue_schedule(queue_id))


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


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (PID 1 here may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def postfix_unavailable() -> str | None:
    """None if throwaway Postfix instances can run on this machine, else why not (tests
    skip with it, benchmarks report it)."""
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


def stop_all(instances: Sequence[LocalInstance]) -> list[str]:
    """Stop every instance, newest first, even when some fail; return what went wrong."""
    errors = []
    for inst in reversed(instances):
        try:
            inst.stop()
        except Exception as exc:  # keep stopping the others
            errors.append(f"{inst.root}: {exc}")
    return errors


@contextlib.contextmanager
def running_instance(root: Path, settings: InstanceSettings | None = None, *, tls_policy: str = "",
            transport: str = "") -> Iterator[LocalInstance]:
    """A started instance that is stopped (and its map dir unlocked) on exit."""
    inst = LocalInstance(root, settings)
    inst.create(tls_policy=tls_policy, transport=transport)
    try:
        inst.start()
        yield inst
    finally:
        inst.stop()
