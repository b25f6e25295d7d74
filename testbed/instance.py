"""A throwaway Postfix instance in one directory: the local stand-in for a Postfix pod.

:mod:`testbed.layout` writes its directory and configuration; this module runs
it.  Synchronous on purpose: usable from pytest fixtures, from async tests
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
import signal
import smtplib
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from pathlib import Path
from typing import Any, Self

from mailtls_operator import postfix

from .layout import (
    MASTER_EXE,
    InstanceLayout,
    InstanceSettings,
    PostfixError,
    free_port,
    wait_until,
)
from .postfixroot import build_for

__all__ = ["Delivery", "InstanceSettings", "LocalInstance", "PostfixError", "free_port",
           "postfix_unavailable", "running_instance", "stop_all", "wait_until"]

_DELIVERY_RE = re.compile(
    r"(?P<qid>[0-9A-Za-z]+): to=<(?P<rcpt>[^>]*)>,(?: orig_to=<[^>]*>,)?"
    r" relay=(?P<relay>[^,]*),.*? dsn=(?P<dsn>[0-9.]+), status=(?P<status>\w+)"
    r" \((?P<reason>.*)\)$")


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


class LocalInstance(InstanceLayout):
    """One running Postfix instance in ``root``; see the module docstring."""

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
            if Path(os.readlink(f"/proc/{pid}/exe")) != self.build.host_path(MASTER_EXE):
                return None
            if Path(os.readlink(f"/proc/{pid}/cwd")) != self.build.host_path(self.queue_dir):
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
        self.run(["chattr", "+i", str(self.map_dir)], host=True)
        self._map_dir_locked = True

    def unlock_map_dir(self) -> None:
        """Undo :meth:`lock_map_dir` (so the directory can be removed)."""
        if self._map_dir_locked:
            self.run(["chattr", "-i", str(self.map_dir)], host=True)
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


def postfix_unavailable(version: str = "3.7") -> str | None:
    """None if throwaway instances of Postfix ``version`` can run on this machine, else why
    not (tests skip with it, benchmarks report it)."""
    return build_for(version).unavailable()


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
