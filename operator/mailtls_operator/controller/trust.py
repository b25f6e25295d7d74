"""The tafile check: a policy whose trust-anchor file a pod cannot read is held back.

Postfix defers every message to a key whose tafile it cannot open, so such a
line must not be rolled out; the rest of the table still is.  smtp(8) opens
the file as user postfix, so readability is checked as that user
(``setpriv``), falling back to plain existence where the image lacks it.
"""

from __future__ import annotations

import logging

from .. import postfix
from ..policy import Policy
from ..world import InstanceKey
from .context import Context
from .state import InstanceState

log = logging.getLogger("mailtls.controller")


async def missing_trust_anchors(ctx: Context, key: InstanceKey, state: InstanceState,
                                policies: list[Policy]) -> dict[str, str]:
    """policy ref -> why it is held back from the instance (its tafile is missing)."""
    paths = sorted({f for p in policies for f in p.tafile})
    pod = next((p for p in ctx.world.pods_of(key) if p.ready), None)
    if not paths or pod is None:
        return {}
    ref = ctx.target(pod).pod
    cached = state.trust_anchors
    if cached is not None and cached[:2] == (tuple(paths), pod.uid):
        missing = set(cached[2])
        paths = []
    else:
        missing = set()
    timeout = ctx.config.exec_timeout
    for path in paths:
        try:
            res = await ctx.runner.run(ref, postfix.readable_by(path), timeout=timeout)
            if not res.ok and (res.returncode != 1 or res.stderr.strip()):
                # no setpriv or no user postfix in this image: at least it must exist
                res = await ctx.runner.run(ref, ["test", "-r", postfix.check_map_path(path)],
                                           timeout=timeout)
        except Exception as exc:
            log.warning("%s/%s: cannot check tafile %s: %s", *key, path, exc)
            continue
        if not res.ok:
            missing.add(path)
    if paths:
        state.trust_anchors = (tuple(paths), pod.uid, frozenset(missing))
    return {p.ref: f"tafile {', '.join(sorted(set(p.tafile) & missing))} does not exist in "
                   f"pod {pod.name} or user postfix cannot read it: this policy's lines "
                   f"are held back from {key[1]} (Postfix would defer all its mail)"
            for p in policies if set(p.tafile) & missing}
