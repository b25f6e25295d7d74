"""PodRunner over the Kubernetes exec API, using the official client's websocket code.

Why it is built the way it is (DESIGN.md §7, "exec trap"):

* **stdin needs ``v5.channel.k8s.io``.**  Over ``v4.channel.k8s.io`` a client
  cannot tell the server "stdin is finished", so ``postmap -i`` / ``cat`` wait
  for ever.  v5 adds a close signal (a binary message ``0xff <channel>``),
  which ``kubernetes.stream.ws_client.WSClient.close_channel(0)`` sends when v5
  was negotiated (and silently does nothing otherwise, which is the trap).
* **When stdin is given we offer only v5.**  An API server (or the kubelet
  behind an older one) that lacks v5 then refuses the websocket handshake
  (``403`` with an empty body, from ``x/net/websocket``) *before the command
  starts*.  Had we also offered v4, the command would already be running with
  stdin open when we learn that we cannot close it, and dropping the
  connection gives it EOF on an *empty* input — ``postmap`` would happily
  build an empty table.  Either way :class:`StdinUnsupportedError` is raised
  before a byte of stdin is sent, and the rollout falls back to the table in
  the ConfigMap mounted in the pod.  Without stdin we offer v5 then v4, and a
  v4 exec says so in :attr:`ExecResult.notes`.
* **The exit status comes from the error channel (3)**, a ``metav1.Status``:
  ``Success`` is 0, ``NonZeroExitCode`` carries the code in the ``ExitCode``
  cause; any other failure (executable not found, container gone) means the
  command did not run and is a :class:`PodRunnerError`.
* **The client is synchronous and has no timeouts of its own** — its websocket
  is connected with ``timeout=None``, so a server that accepts the TCP
  connection and never answers the upgrade blocks the calling thread for ever,
  and the client exposes no handle to that socket until the handshake is done.
  Each exec runs in a worker thread (``asyncio.to_thread``) with a deadline; if
  the worker is stuck in a blocking call at the deadline, the event loop shuts
  down every socket that worker thread created (found through the
  ``socket.__new__`` audit event, see :func:`_audit_hook`), which wakes it up,
  so the thread ends and the socket is closed rather than leaked.
* **We do not use ``kubernetes.stream.stream()``**: it swaps
  ``api_client.call_api`` on the *shared* ApiClient for the duration of the
  call, which is not thread-safe — two concurrent execs can leave the ApiClient
  permanently routed to the websocket transport.  We serialise the request with
  the client's own ``ApiClient.param_serialize`` (same URL encoding and auth
  headers as the generated ``connect_get_namespaced_pod_exec``) and open it
  with ``ws_client.WSClient``, the code ``stream()`` itself uses.

Layout: :mod:`.runner` (the runner), :mod:`.wire` (the websocket side, in the worker
thread), :mod:`.cutloose` (sockets of a stuck thread shut down at the deadline).
"""

from __future__ import annotations

from .runner import KubernetesExecRunner
from .wire import V4_CHANNEL_PROTOCOL, V4_NOTE, V5_CHANNEL_PROTOCOL

__all__ = ["V4_CHANNEL_PROTOCOL", "V4_NOTE", "V5_CHANNEL_PROTOCOL", "KubernetesExecRunner"]
