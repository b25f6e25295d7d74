"""``pods/exec`` into a podman container through the real kube-apiserver and kwok.

The path a command takes: the operator's websocket exec client -> kube-apiserver
(authentication, the chart's RBAC, admission) -> kwok's kubelet endpoint for the pod's
node -> the pod's ``Exec`` mapping, which runs the argv locally -> a shim of the same
name first on kwok's ``PATH`` -> ``podman exec --interactive CONTAINER ARGV...`` in the
container that the ``Exec``'s environment names (:data:`CONTAINER_ENV`).  stdin, stdout,
stderr and the exit code pass through each hop, so the operator's own commands (the
table written over stdin, postmap, mv, postconf, postqueue) run in the Postfix image as
a kubelet would run them: as the container's user, in its filesystem.

Why this route and not the agent sidecar: the operator image's exec client is what the
chart's default strategy uses, and the end-to-end test is there to prove it in the
image; the agent strategy is proven through the real server in
tests/cluster/operating/test_operator_agent_pods.py.  Why shims: kwok runs a mapped exec
as a local process looked up on its own ``PATH`` (with the ``Exec``'s working directory
and environment); it has no container runtime of its own.

Only the command names the operator runs have shims (:data:`COMMANDS`); kwok answers any
other with "executable file not found", as a kubelet does for a command missing in the
image.
"""

from __future__ import annotations

from pathlib import Path

CONTAINER_ENV = "MAILTLS_PODMAN_CONTAINER"
#: What the operator execs in a Postfix pod (mailtls_operator.postfix and its checks).
COMMANDS = ("sh", "postmap", "postconf", "postqueue", "postfix", "mv", "cp", "rm", "setpriv",
            "posttls-finger", "cat", "true")
_SHIM = f"""#!/bin/sh
# kwok runs a pod's exec here; the pod's Exec object names the podman container.
if [ -z "${{{CONTAINER_ENV}:-}}" ]; then
    echo "${{0##*/}}: no {CONTAINER_ENV} in this pod's Exec mapping" >&2
    exit 127
fi
exec podman exec --interactive "${CONTAINER_ENV}" "${{0##*/}}" "$@"
"""


def write_shims(directory: Path) -> Path:
    """One shim per command in :data:`COMMANDS` in ``directory`` (for kwok's PATH)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        shim = directory / name
        shim.write_text(_SHIM)
        shim.chmod(0o755)
    return directory
