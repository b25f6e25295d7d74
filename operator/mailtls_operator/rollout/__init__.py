"""The ``exec`` rollout strategy: rendered tables into running Postfix pods, verified.

Independent of Kubernetes: everything happens through a
:class:`~.podrunner.PodRunner` with argv from :mod:`.postfix`; the controller
calls :func:`roll_out` and turns the outcome into annotations, status and
events.  Per pod (:func:`apply_to_pod`, DESIGN.md §7):

1. **stage** each table next to the live one (``<path>.mailtls-new``): the
   text on stdin, its byte count checked (a transport that cut stdin short
   must not compile half a table), then ``postmap`` it.  Both tables are
   staged before either goes live, so a failure in the second leaves the
   pod entirely on the old revision.
2. **swap**: ``mv`` the compiled database over the live one, then the text
   (rename(2) in one directory: Postfix sees the old or the new table,
   never a partial one).  The TLS policy goes first: a new ``route: direct``
   transport entry must never be live before the policy that protects it.
3. ``postfix reload`` only for ``texthash`` (read once per process), when the
   transport table changed (trivial-rewrite keeps routing with the old one on
   its long-lived connections: measured), or when the pod asks for it
   (``mailtls.io/reload: "true"``).  A TLS-policy-only change of an indexed
   table (lmdb, cdb, hash, btree) needs none: the smtp client notices the
   renamed file before its next connection ("table ... has changed --
   restarting"), while a reload stalls deliveries (DESIGN.md §7; ``make
   bench`` measures it).
4. **verify** with ``postmap -q`` that the live table returns exactly the
   rendered values for the revision key (``mailtls-revision.invalid``) and a
   deterministic sample of keys.

A step that fails stops the pod with the step's name and Postfix's own
message; a table whose ``postmap`` failed is never swapped and the staged
files are removed.  :func:`roll_out` takes pods in a stable order, at most
``parallelism`` at a time, and stops at the first pod that does not verify,
leaving the rest on the old table.

Exec transports that cannot close stdin (``v4.channel.k8s.io``) raise
:class:`~.podrunner.StdinUnsupportedError`; the table is then staged with
``cp`` from the ConfigMap mounted in the pod once its sha256 shows the kubelet
has synced the new revision (until then the pod outcome is ``waiting``, which
is retryable and not an error).

Layout: :mod:`.model` (targets, tables, outcomes; pure), :mod:`.pod` (one pod),
:mod:`.drive` (many pods).
"""

from __future__ import annotations

from .drive import (
    roll_out,
)
from .model import (
    DEFAULT_CONFIGMAP_DIR,
    DEFAULT_MAP_PATH,
    DEFAULT_MAP_TYPE,
    DEFAULT_SAMPLE,
    DEFAULT_TIMEOUT,
    INDEXED_TYPES,
    PodOutcome,
    PodStatus,
    PodTarget,
    Rendered,
    RolloutOutcome,
    Step,
    TableSet,
)
from .pod import (
    PodDone,
    apply_to_pod,
    sample_keys,
)

__all__ = [
    "DEFAULT_CONFIGMAP_DIR",
    "DEFAULT_MAP_PATH",
    "DEFAULT_MAP_TYPE",
    "DEFAULT_SAMPLE",
    "DEFAULT_TIMEOUT",
    "INDEXED_TYPES",
    "PodDone",
    "PodOutcome",
    "PodStatus",
    "PodTarget",
    "Rendered",
    "RolloutOutcome",
    "Step",
    "TableSet",
    "apply_to_pod",
    "roll_out",
    "sample_keys",
]
