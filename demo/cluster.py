"""The moving parts of ``make demo`` that are not the story: binaries, the operator
process, kubectl with its output shown, and waiting on what the server says.

Everything here is bounded in time and stops what it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from testbed.controlplane import REPO, ControlPlane, ControlPlaneError
from testbed.instance import free_port
from testbed.wait import until

MAILTLS = str(Path(sys.executable).with_name("mailtls"))
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def show(text: str, indent: str = "   ") -> None:
    for line in text.rstrip("\n").splitlines():
        print(f"{indent}{line}", flush=True)


def locate_binaries() -> Path:
    """``make controlplane``'s directory: ``tools/build.sh``, its progress lines (stderr)
    shown as they come when it has to build, instant once cached."""
    began = time.monotonic()
    print("   $ make controlplane   (tools/build.sh: etcd, kube-apiserver, kubectl, kwok "
          "from pinned Go modules)", flush=True)
    done = subprocess.run(["bash", str(REPO / "tools" / "build.sh")],  # noqa: S603
                          stdout=subprocess.PIPE, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise ControlPlaneError(f"tools/build.sh failed ({done.returncode}); see above")
    took = time.monotonic() - began
    state = "cached" if took < 2 else f"built in {took:.0f} s"
    print(f"   binaries: {lines[-1]} ({state})", flush=True)
    return Path(lines[-1])


class Kubectl:
    """The built kubectl against the demo's server, each command printed before its
    output (without the kubeconfig and cache flags the test bed adds)."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def __call__(self, *args: str, input: str | None = None, head: int | None = None,
                 quiet: bool = False) -> str:
        shown = " ".join(a if " " not in a else repr(a) for a in args)
        if not quiet:
            print(f"   $ kubectl {shown}", flush=True)
        out = self.plane.kubectl(*args, input=input, timeout=60).stdout
        if not quiet:
            lines = out.rstrip("\n").splitlines()
            show("\n".join(lines[:head] if head else lines), "     ")
            if head and len(lines) > head:
                print(f"     {DIM}... ({len(lines) - head} more lines){RESET}", flush=True)
        return out


class OperatorProcess:
    """``mailtls run`` as a subprocess with a kubeconfig, exactly as a user starts it; its
    JSON log is followed and the controller's lines printed as ``[operator]``."""

    def __init__(self, kubeconfig: Path, log: Path, args: list[str]) -> None:
        self.health = free_port()
        self.metrics = free_port()
        self.argv = [MAILTLS, "run", "--log-format", "json",
                     "--health", f"127.0.0.1:{self.health}",
                     "--metrics", f"127.0.0.1:{self.metrics}", *args]
        self.kubeconfig, self.log = kubeconfig, log
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._follower = threading.Thread(target=self._follow, name="operator-log",
                                          daemon=True)

    def start(self) -> OperatorProcess:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        env.pop("KUBERNETES_SERVICE_HOST", None)  # never an in-cluster config
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env=env, stdout=out,  # noqa: S603
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self._follower.start()
        until(lambda: self._healthy() or self._exited(), 60, "the operator's /healthz")
        if self._exited():
            raise RuntimeError(f"mailtls run exited ({self.proc.returncode}); see {self.log}")
        return self

    def _exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health}/healthz",
                                        timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def samples(self, name: str) -> list[str]:
        """The lines of the operator's /metrics whose series starts with ``name``."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics",
                                    timeout=5) as resp:
            text = resp.read().decode()
        return [line for line in text.splitlines() if line.startswith(name)]

    def metric(self, name: str) -> float:
        """The sum of a Prometheus series of the operator's /metrics (0 if absent)."""
        return sum(float(line.rsplit(" ", 1)[1]) for line in self.samples(name))

    def _follow(self) -> None:
        with self.log.open("rb") as f:
            while not self._stop.is_set():
                line = f.readline()
                if not line:
                    time.sleep(0.05)
                    continue
                self._print(line)

    @staticmethod
    def _print(line: bytes) -> None:
        try:
            rec: dict[str, Any] = json.loads(line)
        except ValueError:
            return
        logger, level = rec.get("logger", ""), rec.get("level", "")
        if (logger.startswith("mailtls.controller") and level == "INFO") or \
                level in ("WARNING", "ERROR", "CRITICAL"):
            print(f"   {DIM}[operator] {rec.get('message', '')[:160]}{RESET}", flush=True)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 15 s; the exit status."""
        self._stop.set()
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
            code = self.proc.returncode
        if self._follower.is_alive():
            self._follower.join(5)
        return code
