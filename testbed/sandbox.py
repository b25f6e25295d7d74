"""What a kubelet does for a Postfix pod, done locally for pods on kwok's nodes.

kwok simulates a pod's *status*; nothing runs its containers.  :class:`PodSandbox`
watches the pods bound to the cluster's nodes (by the real scheduler) and, for each pod
of a Postfix instance (label ``mailtls.io/instance``), does what the kubelet would do
before reporting its containers started:

1. **Volumes** -- the one stand-in: each ``configMap`` volume (and each ``configMap``
   source of a ``projected`` one) is written once, at pod start, into a directory of
   the pod's own, one file per key, "as the kubelet's volume would"; ``emptyDir`` is an
   empty directory (mode 0777).  The kubelet's later refresh of a mounted ConfigMap is
   not simulated.  Other volume types are not materialised (noted in the log).
2. **Mounts** -- every command "in a container" runs in a fresh private mount namespace
   (``unshare --mount``) in which each of the container's ``volumeMounts`` is
   bind-mounted at its ``mountPath`` (read-only where Kubernetes mounts read-only), so
   the operator's paths (``/var/lib/mailtls/tls_policy``, a policy's
   ``/etc/postfix/tls/...`` tafile) name that pod's files and no other.  Nothing is
   ever mounted in the machine's own mount namespace; missing mount-point directories
   (e.g. ``/var/lib/mailtls``) are created empty on the machine.
3. **Init containers** run for real, in order, with their ``command``/``args``,
   ``env`` and ``runAsUser``/``runAsGroup``: the example's ``load-tables.sh`` loads the
   ConfigMap's tables into the ``tables`` emptyDir with ``postmap``.  The image is not
   used: the commands are the machine's (Debian bookworm's Postfix 3.7, as in the
   example image).
4. **The Postfix container** is a :class:`~testbed.instance.LocalInstance` (loopback,
   own port, own queue) whose main.cf names the pod's tables
   (``smtp_tls_policy_maps = lmdb:/var/lib/mailtls/tls_policy``, from the pod's
   ``mailtls.io/map-path``), its master started inside the container's mounts.
5. **Exec** -- a kwok ``Exec`` object maps exec in that container to local commands in
   the container's directory, whose ``.pod-mounts`` file the command wrappers
   (:func:`write_wrappers`, first on kwok's ``PATH``) turn into the mount namespace.
6. **Started** -- once an exec through kube-apiserver answers, the pod is annotated
   :data:`STARTED`; kwok's pod-ready stage (gated on it, see
   :func:`testbed.kwok.gated`) then makes it Running and Ready.  A pod of no Postfix
   instance (e.g. the operator's own) has nothing to run and is marked at once.

A deleted pod's Postfix is stopped, its ``Exec`` removed and its directory deleted.
Not done here (what a kubelet adds): running the images, probes, resource limits, the
securityContext beyond the user, volume refresh, logs.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import logging
import os
import posixpath
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .controlplane import ControlPlane, ControlPlaneError
from .instance import InstanceSettings, LocalInstance
from .kwok import Kwok
from .layout import SBIN_PATH

log = logging.getLogger("testbed.sandbox")

#: The pod annotation kwok's gated pod-ready stage waits for.
STARTED = "testbed.mailtls.io/containers-started"
INSTANCE_LABEL = "mailtls.io/instance"
ANN_CONTAINER = "mailtls.io/container"
ANN_MAP_PATH = "mailtls.io/map-path"
ANN_MAP_TYPE = "mailtls.io/map-type"
DEFAULT_MAP_PATH = "/var/lib/mailtls/tls_policy"
DEFAULT_MAP_TYPE = "lmdb"
MOUNTS_FILE = ".pod-mounts"
#: main.cf parameters of a pod's Postfix that stay the test bed's (its own queue,
#: directories, log, loopback listener); the rest comes from the main.cf the pod mounts.
TESTBED_MAIN_CF = frozenset({
    "config_directory", "queue_directory", "data_directory", "meta_directory",
    "mail_owner", "setgid_group",
    "syslog_name", "maillog_file", "maillog_file_prefixes", "inet_interfaces",
    "smtp_tcp_port"})
#: The commands an exec into a sandboxed container may run (kwok looks an exec's
#: command up on its own PATH, where a wrapper of each name comes first).  Any other
#: command runs without the pod's mounts.
POD_COMMANDS = ("sh", "bash", "cat", "cp", "mv", "rm", "ls", "test", "true", "false",
                "env", "sha256sum", "setpriv", "gzip", "postmap", "postconf", "postfix",
                "postqueue", "postsuper", "postcat", "posttls-finger", "postlog")
START_TIMEOUT = 60.0

WRAPPER = r"""#!/bin/sh
# Written by testbed/sandbox.py. Runs the command this link is named after: in a pod
# sandbox's container directory (a .pod-mounts file in the working directory) inside a
# fresh private mount namespace with the container's volumes bind-mounted, else as is.
here=${0%/*}
name=${0##*/}
PATH=$(printf ':%s:' "$PATH" | sed "s#:$here:#:#g; s#^:##; s#:\$##")
export PATH
[ -f .pod-mounts ] || exec "$name" "$@"
exec unshare --mount --propagation private -- sh -c '
  user=""
  while read -r src dst opt; do
    case $src in
      user) user="--reuid=$dst --regid=$opt --clear-groups" ;;
      *) mount --bind -- "$src" "$dst" || exit 126
         if [ "$opt" = ro ]; then mount -o remount,bind,ro -- "$dst" || exit 126; fi ;;
    esac
  done < .pod-mounts
  [ -z "$user" ] || exec setpriv $user -- "$@"
  exec "$@"' "$name" "$name" "$@"
"""


def sandbox_unavailable() -> str | None:
    """Why pods cannot be sandboxed on this machine (None: they can).  The sandbox
    creates mount namespaces and mount points, which needs root."""
    if os.geteuid() != 0:
        return "the pod sandbox needs root (mount namespaces, mount points such as " \
               "/var/lib/mailtls)"
    try:
        done = subprocess.run(["unshare", "--mount", "--propagation", "private",
                               "true"], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare --mount: {exc}"
    if done.returncode != 0:
        return f"unshare --mount fails here: {done.stderr.strip()}"
    return None


def write_wrappers(directory: Path) -> Path:
    """The command wrappers (one script, a link per :data:`POD_COMMANDS` name) in
    ``directory``; put it first on kwok's ``PATH``."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / ".podexec"
    script.write_text(WRAPPER)
    script.chmod(0o755)
    for name in POD_COMMANDS:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(script.name)
    return directory


class SandboxError(RuntimeError):
    """A pod could not be started; the message names the pod and the step."""


@dataclass
class SandboxPod:
    """One pod the sandbox runs."""

    namespace: str
    name: str
    uid: str
    root: Path
    instance: LocalInstance | None = None
    container: str = ""


class PodSandbox:
    """Runs what kwok's pods would run (see the module docstring); a context manager."""

    def __init__(self, plane: ControlPlane, kwok: Kwok, workdir: Path, *,
                 bin_dir: Path) -> None:
        self.plane = plane
        self.kwok = kwok
        self.workdir = workdir
        self.bin_dir = bin_dir
        #: pod uid -> what runs for it
        self.pods: dict[str, SandboxPod] = {}
        #: pod uid -> why it could not be started
        self.failures: dict[str, str] = {}
        #: pod uid -> (namespace, name) of every pod handed to a worker, until deleted
        self._seen: dict[str, tuple[str, str]] = {}
        self._chains: dict[tuple[str, str], Future[None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="sandbox")
        self._thread: threading.Thread | None = None
        self._base: Path | None = None
        self._api: Any = None
        self._log_handler: logging.Handler | None = None

    def __enter__(self) -> PodSandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> PodSandbox:
        """Start watching pods.  Pod directories live under a fresh 0755 directory in
        ``/var/tmp`` (Postfix's own users must reach in, and a pod's ``/tmp`` mount must
        not hide them)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log_handler = logging.FileHandler(self.workdir / "sandbox.log")
        self._log_handler.setFormatter(logging.Formatter(
            "%(asctime)s %(threadName)s %(message)s"))
        log.addHandler(self._log_handler)
        log.setLevel(logging.INFO)
        self._base = Path(tempfile.mkdtemp(prefix="mailtls-sandbox-", dir="/var/tmp"))
        self._base.chmod(0o755)
        self._api = self.plane.api_client()
        atexit.register(self.stop)
        self._thread = threading.Thread(target=self._watch, name="sandbox-watch",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching, then stop every pod's Postfix and remove its files;
        idempotent."""
        atexit.unregister(self.stop)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            pods = list(self.pods.values())
            self.pods.clear()
        for pod in pods:
            self._teardown(pod)
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
        if self._api is not None:
            self._api.close()
            self._api = None
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    # -- lookups for tests -----------------------------------------------------------

    def instance(self, namespace: str, name: str) -> LocalInstance | None:
        """The local Postfix of the live pod ``namespace/name``, if it runs."""
        with self._lock:
            for pod in self.pods.values():
                if (pod.namespace, pod.name) == (namespace, name):
                    return pod.instance
        return None

    # -- the watch -------------------------------------------------------------------

    def _watch(self) -> None:
        from kubernetes import client, watch

        core: Any = client.CoreV1Api(self._api)
        resource_version = ""
        while not self._stop.is_set():
            try:
                if not resource_version:
                    listed = core.list_pod_for_all_namespaces()
                    resource_version = listed.metadata.resource_version
                    pods = [self._api.sanitize_for_serialization(p) for p in listed.items]
                    live = {p["metadata"]["uid"] for p in pods}
                    for uid in [u for u in self._seen if u not in live]:
                        self._dispatch_delete(uid)
                    for pod in pods:
                        self._dispatch(pod)
                watcher: Any = watch.Watch()  # type: ignore[no-untyped-call]
                stream = watcher.stream(
                    core.list_pod_for_all_namespaces, resource_version=resource_version,
                    timeout_seconds=1)
                for event in stream:
                    obj = self._api.sanitize_for_serialization(event["object"])
                    if event["type"] == "ERROR":
                        resource_version = ""
                        break
                    resource_version = obj["metadata"]["resourceVersion"]
                    if event["type"] == "DELETED":
                        self._dispatch_delete(obj["metadata"]["uid"])
                    else:
                        self._dispatch(obj)
                    if self._stop.is_set():
                        break
            except Exception as exc:  # the API server restarting, a 410: list again
                log.info("pod watch: %s: listing again", exc)
                resource_version = ""
                self._stop.wait(0.5)

    def _dispatch(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        uid = meta["uid"]
        if meta.get("deletionTimestamp"):
            self._dispatch_delete(uid)
            return
        if not spec.get("nodeName") or uid in self._seen:
            return
        self._seen[uid] = (meta["namespace"], meta["name"])
        self._submit(self._seen[uid], lambda: self._setup(pod), uid)

    def _dispatch_delete(self, uid: str) -> None:
        key = self._seen.pop(uid, None)
        if key is None:
            return

        def teardown() -> None:
            with self._lock:
                pod = self.pods.pop(uid, None)
            if pod is not None:
                self._teardown(pod)
        self._submit(key, teardown, uid)

    def _submit(self, key: tuple[str, str], step: Callable[[], None], uid: str) -> None:
        """Run ``step`` in the pool after every earlier step for the same pod name: a
        StatefulSet's pod comes back under its old name (and kwok ``Exec`` object)
        while the old one may still be being torn down."""
        if self._stop.is_set():
            return
        before = self._chains.get(key)

        def run() -> None:
            if before is not None:
                with contextlib.suppress(Exception):
                    before.result()
            try:
                step()
            except Exception as exc:
                log.exception("sandbox: %s/%s: %s", *key, exc)
                self.failures[uid] = str(exc)
        self._chains[key] = self._pool.submit(run)

    # -- one pod ---------------------------------------------------------------------

    def _setup(self, obj: dict[str, Any]) -> None:
        meta, spec = obj["metadata"], obj["spec"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
        container_name = annotations.get(ANN_CONTAINER, "postfix")
        container = next((c for c in spec.get("containers") or []
                          if c["name"] == container_name), None)
        if INSTANCE_LABEL not in labels or container is None:
            self._mark_started(ns, name, "nothing to run here")
            return
        began = time.monotonic()
        assert self._base is not None
        pod = SandboxPod(ns, name, uid, self._base / f"{ns}.{name}.{uid[:8]}",
                         container=container_name)
        pod.root.mkdir(mode=0o755)
        with self._lock:
            self.pods[uid] = pod
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        workdir = self._container_dir(pod, container, volumes, obj)
        # kwok learns of an Exec through its watch: create it first, so its delay
        # overlaps the rest of the start.
        self.kwok.unmap_exec(ns, name)
        map_path = annotations.get(ANN_MAP_PATH, DEFAULT_MAP_PATH)
        map_type = annotations.get(ANN_MAP_TYPE, DEFAULT_MAP_TYPE)
        main_cf = {"smtp_tls_policy_maps": f"{map_type}:{map_path}",
                   "transport_maps": f"{map_type}:{posixpath.dirname(map_path)}/transport",
                   **self._pod_main_cf(pod, container, volumes, obj)}
        inst = LocalInstance(pod.root / "postfix", InstanceSettings(
            name=name, map_type=map_type, extra_main_cf=main_cf))
        env = {**_env_of(container, obj), **inst.env}
        self.kwok.map_exec(ns, name, work_dir=workdir, env=env, containers=(container_name,))
        for init in spec.get("initContainers") or []:
            self._run_init(pod, init, volumes, obj)
        inst.create()
        pod.instance = inst
        self._start_postfix(inst, workdir)
        self._wait_exec(ns, name, container_name)
        self._mark_started(ns, name, f"Postfix on 127.0.0.1:{inst.smtpd_port}, "
                                     f"started in {time.monotonic() - began:.2f} s")

    def _container_dir(self, pod: SandboxPod, container: dict[str, Any],
                       volumes: Mapping[str, dict[str, Any]], obj: dict[str, Any]) -> Path:
        """The container's directory with its ``.pod-mounts`` (one ``SOURCE TARGET [ro]``
        line per mount, parents before children, then ``user UID GID`` if not root);
        the volumes it mounts are materialised on first use."""
        directory = pod.root / "containers" / str(container["name"])
        directory.mkdir(parents=True)
        mounts: list[tuple[str, Path, bool]] = []
        for mount in container.get("volumeMounts") or []:
            found = self._mount_source(pod, mount, volumes, obj)
            if found is not None:
                mounts.append((mount["mountPath"], *found))
        lines = [f"{source} {target}{' ro' if ro else ''}"
                 for target, source, ro in self._with_mount_points(pod, mounts)]
        user = _run_as(container, obj)
        if user is not None:
            lines.append(f"user {user[0]} {user[1]}")
        (directory / MOUNTS_FILE).write_text("".join(f"{ln}\n" for ln in lines))
        return directory

    def _pod_main_cf(self, pod: SandboxPod, container: dict[str, Any],
                     volumes: Mapping[str, dict[str, Any]],
                     obj: dict[str, Any]) -> dict[str, str]:
        """The parameters of the main.cf the container mounts (the example's, from its
        ConfigMap), but for those :data:`TESTBED_MAIN_CF` keeps; {} if it mounts none."""
        for mount in container.get("volumeMounts") or []:
            if mount["mountPath"].rstrip("/") not in ("/etc/postfix/main.cf", "/etc/postfix"):
                continue
            found = self._mount_source(pod, mount, volumes, obj)
            if found is None:
                continue
            source = found[0] if found[0].is_file() else found[0] / "main.cf"
            if not source.is_file():
                continue
            copy = pod.root / "pod-main-cf"
            copy.mkdir(exist_ok=True)
            shutil.copyfile(source, copy / "main.cf")
            done = subprocess.run(["postconf", "-c", str(copy), "-n"],  # noqa: S603
                                  capture_output=True, text=True, timeout=30, check=True,
                                  env={"PATH": SBIN_PATH, "LANG": "C.UTF-8"})
            params = {}
            for line in done.stdout.splitlines():
                key, _, value = line.partition("=")
                if key.strip() and key.strip() not in TESTBED_MAIN_CF:
                    params[key.strip()] = value.strip()
            return params
        return {}

    def _mount_source(self, pod: SandboxPod, mount: dict[str, Any],
                      volumes: Mapping[str, dict[str, Any]],
                      obj: dict[str, Any]) -> tuple[Path, bool] | None:
        """(source path, read-only) of one volumeMount; None when not simulated."""
        assert self._base is not None
        target = mount["mountPath"]
        volume = volumes.get(mount["name"])
        if volume is None:
            raise SandboxError(f"{pod.namespace}/{pod.name}: no volume {mount['name']}")
        if self._base.is_relative_to(target):
            log.info("%s/%s: %s not mounted (it would hide the sandbox)", pod.namespace,
                     pod.name, target)
            return None
        source = self._volume(pod, volume, obj)
        if source is None:
            return None
        if mount.get("subPath"):
            source = source / mount["subPath"]
        if not source.exists():
            raise SandboxError(f"{pod.namespace}/{pod.name}: volume {mount['name']} has no "
                               f"{mount.get('subPath')}")
        read_only = bool(mount.get("readOnly")) or "configMap" in volume \
            or "projected" in volume
        return source, read_only

    def _with_mount_points(self, pod: SandboxPod, mounts: list[tuple[str, Path, bool]]
                           ) -> list[tuple[str, Path, bool]]:
        """The mounts, parents first, each with somewhere to mount on.  A missing
        directory is created empty on the machine (``/var/lib/mailtls``).  A missing
        file (a ``subPath`` mount of ``/etc/postfix/main.cf`` where the machine has
        none) is never created there: its parent directory is copied into the pod and
        mounted over the original, with the file's mount point in the copy -- the
        image's directory, as the container would see it."""
        overlays: dict[str, Path] = {}
        for target, source, _ in mounts:
            if source.is_file() and not os.path.isfile(target):
                parent = posixpath.dirname(target)
                if parent not in overlays:
                    # one copy per pod, shared by its containers
                    copy = pod.root / "overlays" / parent.strip("/").replace("/", "_")
                    if copy.exists():
                        pass
                    elif os.path.isdir(parent):
                        shutil.copytree(parent, copy, symlinks=True)
                    else:
                        copy.mkdir(parents=True)
                    overlays[parent] = copy
                (overlays[parent] / posixpath.basename(target)).touch()
        out = [(parent, copy, False) for parent, copy in overlays.items()]
        for target, source, ro in mounts:
            out.append((target, source, ro))
            if not source.is_dir():
                continue
            covering = next((p for p in overlays if posixpath.dirname(target) == p), None)
            if covering is not None:
                (overlays[covering] / posixpath.basename(target)).mkdir(exist_ok=True)
            elif not os.path.isdir(target):
                os.makedirs(target, exist_ok=True)
                log.info("created the mount point %s on this machine", target)
        return sorted(out, key=lambda m: m[0].rstrip("/").count("/"))

    def _volume(self, pod: SandboxPod, volume: dict[str, Any],
                obj: dict[str, Any]) -> Path | None:
        """The volume's directory, written on first use; None for a type not simulated."""
        directory = pod.root / "volumes" / str(volume["name"])
        if directory.exists():
            return directory
        if "emptyDir" in volume:
            directory.mkdir(parents=True)
            directory.chmod(0o777)
            return directory
        sources: list[dict[str, Any]] = []
        if "configMap" in volume:
            sources = [volume["configMap"]]
        elif "projected" in volume:
            sources = [s["configMap"] for s in volume["projected"].get("sources") or []
                       if "configMap" in s]
        else:
            log.info("%s/%s: volume %s (%s) not simulated", pod.namespace, pod.name,
                     volume["name"], ", ".join(k for k in volume if k != "name"))
            return None
        directory.mkdir(parents=True)
        for source in sources:
            self._write_configmap(pod, directory, source)
        return directory

    def _write_configmap(self, pod: SandboxPod, directory: Path,
                         source: dict[str, Any]) -> None:
        """One ConfigMap's keys as files, as the kubelet's volume shows them at start."""
        name = source["name"]
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                cm = self.plane.request(
                    "GET", f"/api/v1/namespaces/{pod.namespace}/configmaps/{name}")
                break
            except ControlPlaneError as exc:
                if ": 404 " not in str(exc):
                    raise
                if source.get("optional"):
                    return
                if time.monotonic() > deadline:  # the kubelet would keep waiting
                    raise SandboxError(f"{pod.namespace}/{pod.name}: ConfigMap {name} does "
                                       "not exist") from exc
                time.sleep(0.2)
        files: dict[str, bytes] = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
        files.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
        items = {i["key"]: i["path"] for i in source.get("items") or []}
        for key, content in files.items():
            if items and key not in items:
                continue
            path = directory / items.get(key, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(0o644)
            # Postfix re-reads a config file younger than a second until it is older
            # (about 1.5 s per command); the kubelet's files are rarely that fresh.
            os.utime(path, (time.time() - 10, time.time() - 10))

    def _run_init(self, pod: SandboxPod, init: dict[str, Any],
                  volumes: Mapping[str, dict[str, Any]], obj: dict[str, Any]) -> None:
        """Run an init container's command to completion inside its mounts."""
        directory = self._container_dir(pod, init, volumes, obj)
        argv = [*(init.get("command") or []), *(init.get("args") or [])]
        if not argv or not (self.bin_dir / posixpath.basename(argv[0])).exists():
            raise SandboxError(f"{pod.namespace}/{pod.name}: init container {init['name']}: "
                               f"command {argv[:1]} is not one the sandbox runs "
                               "(the image's entrypoint is not known here)")
        argv[0] = str(self.bin_dir / posixpath.basename(argv[0]))
        env = {"PATH": SBIN_PATH, "LANG": "C.UTF-8", **_env_of(init, obj)}
        logfile = pod.root / f"init-{init['name']}.log"
        with logfile.open("wb") as out:
            done = subprocess.run(argv, cwd=directory, env=env, stdout=out,  # noqa: S603
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=START_TIMEOUT, check=False)
        text = logfile.read_text(errors="replace").strip()
        log.info("%s/%s: init container %s exited %d: %s", pod.namespace, pod.name,
                 init["name"], done.returncode, text.replace("\n", " | "))
        if done.returncode != 0:
            raise SandboxError(f"{pod.namespace}/{pod.name}: init container {init['name']} "
                               f"exited with {done.returncode}: {text[-400:]}")

    def _start_postfix(self, inst: LocalInstance, workdir: Path) -> None:
        """``postfix start`` inside the container's mounts; wait for smtpd."""
        argv = [str(self.bin_dir / "postfix"), "-c", str(inst.etc_dir), "start"]
        done = subprocess.run(argv, cwd=workdir, env=inst.env, capture_output=True,  # noqa: S603
                              timeout=START_TIMEOUT, check=False)
        if done.returncode != 0:
            raise SandboxError(f"postfix start in {inst.root}: exit {done.returncode}: "
                               f"{done.stderr.decode(errors='replace').strip()}")
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(inst.smtpd_port):
            if time.monotonic() > deadline:
                raise SandboxError(f"smtpd of {inst.root} not answering on "
                                   f"{inst.smtpd_port}")
            time.sleep(0.05)

    def _wait_exec(self, ns: str, name: str, container: str) -> None:
        """An exec through kube-apiserver reaches the container (kwok has the Exec)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            done = self.plane.kubectl("exec", "-n", ns, name, "-c", container, "--", "true",
                                      check=False, timeout=20)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise SandboxError(f"{ns}/{name}: exec not served after "
                                   f"{START_TIMEOUT:.0f} s: {done.stderr.strip()}")
            time.sleep(0.2)

    def _mark_started(self, ns: str, name: str, what: str) -> None:
        self.plane.request("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}",
                           {"metadata": {"annotations": {STARTED: "true"}}},
                           content_type="application/merge-patch+json")
        log.info("%s/%s: started (%s)", ns, name, what)

    def _teardown(self, pod: SandboxPod) -> None:
        if pod.instance is not None:
            with contextlib.suppress(Exception):
                pod.instance.stop()
        with contextlib.suppress(Exception):
            self.kwok.unmap_exec(pod.namespace, pod.name)
        shutil.rmtree(pod.root, ignore_errors=True)
        log.info("%s/%s: stopped and removed", pod.namespace, pod.name)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _run_as(container: dict[str, Any], obj: dict[str, Any]) -> tuple[int, int] | None:
    """(uid, gid) the container runs as, when not root (container over pod context)."""
    pod_ctx = (obj.get("spec") or {}).get("securityContext") or {}
    ctx = container.get("securityContext") or {}
    uid = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
    gid = ctx.get("runAsGroup", pod_ctx.get("runAsGroup", uid))
    if not uid:
        return None
    return int(uid), int(gid if gid is not None else uid)


def _env_of(container: dict[str, Any], obj: dict[str, Any]) -> dict[str, str]:
    """The container's ``env`` with values and the Downward API's name and namespace."""
    fields = {"metadata.name": obj["metadata"]["name"],
              "metadata.namespace": obj["metadata"]["namespace"],
              "metadata.uid": obj["metadata"]["uid"],
              "spec.nodeName": (obj.get("spec") or {}).get("nodeName", "")}
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = ((item.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
            if ref in fields:
                env[item["name"]] = fields[ref]
    return env

