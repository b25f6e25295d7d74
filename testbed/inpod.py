"""A process of this machine run as a pod's container: with the pod's in-cluster
credentials, where a kubelet puts them.

A kubelet mounts the pod's ServiceAccount token and the cluster CA at
``/run/secrets/kubernetes.io/serviceaccount`` (``/var/run`` links there) and sets
``KUBERNETES_SERVICE_HOST``/``PORT``.  :func:`in_pod` gives a command a mount namespace
of its own with a tmpfs over ``/run`` holding those two files (nothing is written on
this machine), and :func:`pod_environment` the variables naming the test bed's API
server.  So ``mailtls agent`` takes its production path (urllib3 alone), not the
official client's kubeconfig loader, which costs it ~20 MiB of RSS.  Needs root
(``unshare --mount``), as the Postfix 3.10 root does.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from .controlplane import ControlPlane

__all__ = ["POD_MOUNTS", "in_pod", "pod_environment"]

POD_MOUNTS = ('mount -t tmpfs tmpfs /run && d=/run/secrets/kubernetes.io/serviceaccount '
              '&& mkdir -p "$d" && cp "$SA/token" "$SA/ca.crt" "$d/" && exec "$@"')
"""Run by ``sh -c`` in the new mount namespace: the files of ``$SA`` at the kubelet's path,
then the command."""


def in_pod(argv: Sequence[str]) -> list[str]:
    """``argv`` as it runs in a pod: its credentials from :func:`pod_environment`'s
    directory (``$SA``) at the kubelet's path, in a mount namespace of its own."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", POD_MOUNTS,
            "in-pod", *argv]


def pod_environment(plane: ControlPlane, directory: Path, token: str) -> dict[str, str]:
    """Write ``token`` (e.g. a pod-bound one: :meth:`ControlPlane.service_account_token`
    with ``pod``) and the cluster CA into ``directory``; the environment a pod's container
    sees for them (plus ``SA``, the directory, for :func:`in_pod`)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "token").write_text(token)
    shutil.copy(plane.ca_file, directory / "ca.crt")
    return {"SA": str(directory), "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": plane.url.rsplit(":", 1)[1]}
