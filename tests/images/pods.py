"""Containers run the way the manifests run them: a Kubernetes container (its
securityContext, the pod's securityContext, its volumeMounts over the pod's volumes)
translated into ``podman run`` arguments, with host directories standing in for the
kubelet's volumes.

The translation is the point of these tests: what the chart and the example
Deployment ask of the images (uid, read-only root, no capabilities, which paths are
writable) is read from the manifests themselves, not restated here, so a manifest
change that an image cannot live with fails here.

What podman cannot express is said where it is skipped: ``runAsNonRoot`` is checked
(the resolved uid must not be 0), and ``seccompProfile: RuntimeDefault`` is podman's
default seccomp filter anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "images" / "build.sh"
CONTAINERS_CONF = ROOT / "images" / "containers.conf"
# The tests build their own tags, one per checkout, so that test runs in several
# checkouts on one machine never run each other's images (the layer cache is shared).
_TAG = "test-" + hashlib.sha256(str(ROOT).encode()).hexdigest()[:10]
OPERATOR_IMAGE = f"localhost/mailtls-operator:{_TAG}"
POSTFIX_IMAGE = f"localhost/mailtls-postfix:{_TAG}"
#: Every container these tests start carries this label and its test process's pid, so
#: that leftovers of a run that was killed are found and removed by label (never by name
#: pattern), and a concurrent run's containers are left alone.
LABEL = "io.mailtls.test=images"
OWNER = "io.mailtls.test.owner"

Obj = dict[str, Any]


def podman_env() -> dict[str, str]:
    """The environment for podman: the project's containers.conf (runc, ulimits, host network)."""
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF",
                                                             str(CONTAINERS_CONF))}


def podman(*args: str, timeout: float = 120, check: bool = True,
           stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``podman ARGS`` (argv, no shell), bounded in time."""
    result = subprocess.run(["podman", *args], input=stdin, capture_output=True,
                            timeout=timeout, env=podman_env(), check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} exited {result.returncode}: "
                           f"{result.stderr.decode(errors='replace')}")
    return result


def security_args(pod_sc: Mapping[str, Any], sc: Mapping[str, Any]) -> list[str]:
    """The ``podman run`` options for a container securityContext (over the pod's)."""
    args: list[str] = []
    user = sc.get("runAsUser", pod_sc.get("runAsUser"))
    group = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and user in (None, 0):
        raise ValueError("runAsNonRoot with no non-zero runAsUser: the kubelet would refuse it")
    if user is not None:
        args += ["--user", f"{user}:{group}" if group is not None else str(user)]
    if sc.get("readOnlyRootFilesystem"):
        # podman adds tmpfs mounts on /tmp, /var/tmp and /run to read-only containers by
        # default; the kubelet does not, so neither do we: only the declared volumes.
        args += ["--read-only", "--read-only-tmpfs=false"]
    caps = sc.get("capabilities") or {}
    args += [f"--cap-drop={c}" for c in caps.get("drop", [])]
    args += [f"--cap-add={c}" for c in caps.get("add", [])]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    profile = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if profile not in (None, "RuntimeDefault"):
        raise ValueError(f"seccompProfile {profile} is not translated")
    return args


@dataclass
class Volumes:
    """Host directories for a pod's volumes, as the kubelet would lay them out.

    ``emptyDir`` volumes are directories of mode 0777 (as the kubelet creates them);
    ``configMap`` volumes are read from ``config_maps`` (name -> {key: text}), a
    missing optional one is an empty directory; a ``projected`` volume merges its
    ConfigMaps' keys.
    """

    base: Path
    pod_volumes: Sequence[Mapping[str, Any]]
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.base / name

    def materialise(self) -> None:
        for vol in self.pod_volumes:
            path = self.path(vol["name"])
            path.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in vol:
                path.chmod(0o777)
                continue
            sources = ([s["configMap"] for s in vol["projected"]["sources"]]
                       if "projected" in vol else [vol["configMap"]])
            for src in sources:
                data = self.config_maps.get(src["name"])
                if data is None and not src.get("optional"):
                    raise KeyError(f"ConfigMap {src['name']} (volume {vol['name']}) is not given")
                self.write(vol["name"], data or {})

    def write(self, volume: str, data: Mapping[str, str]) -> None:
        """Put ConfigMap keys into a volume (as the kubelet refreshes a ConfigMap volume)."""
        for key, text in data.items():
            target = self.path(volume) / key
            tmp = target.with_name(f".{key}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.chmod(0o644)
            tmp.replace(target)

    def mount_args(self, mounts: Sequence[Mapping[str, Any]]) -> list[str]:
        args: list[str] = []
        for m in mounts:
            source = self.path(m["name"])
            if "subPath" in m:
                source = source / m["subPath"]
            opts = "ro" if m.get("readOnly") else "rw"
            args += ["--volume", f"{source}:{m['mountPath']}:{opts}"]
        return args


def container_args(pod: Mapping[str, Any], container: Mapping[str, Any], volumes: Volumes,
                   downward: Mapping[str, str] | None = None) -> list[str]:
    """``podman run`` options for one container of a pod spec (put the image and then
    ``container.get("args", [])`` after them); ``downward`` gives the values of the
    ``fieldRef`` environment variables (``metadata.name`` -> the pod's name).

    Kubernetes' ``command`` replaces the image's ENTRYPOINT (``args`` its CMD), so it
    becomes ``--entrypoint`` in JSON form, not arguments after the image.
    """
    args = security_args(pod.get("securityContext") or {}, container.get("securityContext") or {})
    if "command" in container:
        args += ["--entrypoint", json.dumps(container["command"])]
    args += volumes.mount_args(container.get("volumeMounts") or [])
    for env in container.get("env") or []:
        if "value" in env:
            args += ["--env", f"{env['name']}={env['value']}"]
        else:  # the downward API: fieldPath -> value, as the kubelet fills it in
            path = env["valueFrom"]["fieldRef"]["fieldPath"]
            args += ["--env", f"{env['name']}={(downward or {})[path]}"]
    return args


@dataclass
class Container:
    """A detached container started by a test, removed by :meth:`remove`."""

    name: str

    @classmethod
    def start(cls, name: str, image: str, args: Sequence[str],
              command: Sequence[str] = ()) -> Container:
        podman("run", "--detach", "--name", name, "--label", LABEL,
               "--label", f"{OWNER}={os.getpid()}", *args, image, *command)
        return cls(name)

    def exec(self, *argv: str, stdin: bytes | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return podman("exec", *(["--interactive"] if stdin is not None else []), self.name,
                      *argv, stdin=stdin, timeout=timeout, check=False)

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return (result.stdout + result.stderr).decode(errors="replace")

    def running(self) -> bool:
        result = podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return result.stdout.strip() == b"true"

    def stop(self, timeout: int = 15) -> int:
        """SIGTERM (podman stop), up to ``timeout`` s before SIGKILL; the exit code."""
        podman("stop", "--time", str(timeout), self.name, timeout=timeout + 30)
        out = podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout
        return int(out.strip())

    def remove(self) -> None:
        podman("rm", "--force", "--time", "2", self.name, check=False, timeout=60)

    def wait_for(self, what: str, predicate: Any, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if not self.running():
                raise AssertionError(f"{self.name} exited while waiting for {what}:\n"
                                     f"{self.logs()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {what} within {timeout} s:\n"
                                     f"{self.logs()[-4000:]}")
            time.sleep(0.2)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> None:
    """Remove this process's containers, and those of test runs that no longer exist."""
    listed = podman("ps", "--all", "--filter", f"label={LABEL}", "--format",
                    f'{{{{.ID}}}} {{{{index .Labels "{OWNER}"}}}}', check=False)
    for line in listed.stdout.decode().splitlines():
        cid, _, owner = line.partition(" ")
        if owner.strip() == str(os.getpid()) or not _alive(owner.strip()):
            podman("rm", "--force", "--time", "2", cid, check=False, timeout=60)
