"""The tafile check: a policy whose trust-anchor file a pod cannot read is held back.

Postfix defers every message to a key whose tafile it cannot open, so such a
line must not be rolled out; the rest of the table still is.  smtp(8) opens
the file as user postfix, so readability is checked as that user
(``setpriv``), falling back to plain existence where the image lacks it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .. import postfix
from ..agent.collect import STRATEGY as AGENT
from ..agent.collect import agent_trust_anchors, agent_view
from ..policy import Policy
from ..status import CHECK_UNAVAILABLE, TRUST_ANCHOR_MISSING, TRUST_ANCHOR_UNCHECKED
from ..world import InstanceKey
from .context import RESTART, Context
from .state import InstanceState

log = logging.getLogger("mailtls.controller")

HELD_BACK = (TRUST_ANCHOR_MISSING, CHECK_UNAVAILABLE)
"""Reasons whose policy's lines stay out of the instance's table."""


@dataclass(frozen=True)
class TrustCheck:
    """policy ref -> (reason, message); ``retry`` when a check could not run."""

    found: dict[str, tuple[str, str]] = field(default_factory=dict)
    retry: bool = False

    def held(self, ref: str) -> bool:
        return ref in self.found and self.found[ref][0] in HELD_BACK


async def check_trust_anchors(ctx: Context, key: InstanceKey, state: InstanceState,
                              policies: list[Policy]) -> TrustCheck:
    """Policies whose tafile the instance cannot use.

    ``TrustAnchorMissing``: the check ran and the file is missing or unreadable;
    ``CheckUnavailable``: the check could not run (exec refused or failed), so
    the lines are held back too -- a refusal is never read as "present".  With
    the restart strategy the operator has no exec at all: nothing is run, and
    the policy says ``TrustAnchorUnchecked`` in its Ready message.
    """
    users = [p for p in policies if p.tafile]
    pod = next((p for p in ctx.world.pods_of(key) if p.ready), None)
    if not users or pod is None:
        return TrustCheck()
    if ctx.strategy_of(key) == RESTART:
        return TrustCheck({p.ref: (TRUST_ANCHOR_UNCHECKED,
                                   f"tafile {', '.join(p.tafile)} not checked in {key[1]}: the "
                                   "restart strategy does not exec into pods") for p in users})
    if ctx.strategy_of(key) == AGENT:  # the agents check and report; nothing is run here
        return TrustCheck(agent_trust_anchors(key[1], users,
                                              agent_view(ctx.world.pods_of(key), "")))
    paths = sorted({f for p in users for f in p.tafile})
    ref = ctx.target(pod).pod
    cached = state.trust_anchors
    if cached is not None and cached[:2] == (tuple(paths), pod.uid):
        missing, todo = set(cached[2]), []
    else:
        missing, todo = set(), paths
    timeout = ctx.config.exec_timeout
    unknown: dict[str, str] = {}
    for path in todo:
        try:
            res = await ctx.runner.run(ref, postfix.readable_by(path), timeout=timeout)
            if not res.ok and (res.returncode != 1 or res.stderr.strip()):
                # no setpriv or no user postfix in this image: at least it must exist
                res = await ctx.runner.run(ref, ["test", "-r", postfix.check_map_path(path)],
                                           timeout=timeout)
        except Exception as exc:
            log.warning("%s/%s: cannot check tafile %s: %s", *key, path, exc)
            unknown[path] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            continue
        if not res.ok:
            missing.add(path)
    if todo and not unknown:  # a check that could not run is tried again next time
        state.trust_anchors = (tuple(paths), pod.uid, frozenset(missing))
    out: dict[str, tuple[str, str]] = {}
    for p in users:
        if set(p.tafile) & missing:
            out[p.ref] = (TRUST_ANCHOR_MISSING, (
                f"tafile {', '.join(sorted(set(p.tafile) & missing))} does not exist in "
                f"pod {pod.name} or user postfix cannot read it: this policy's lines are "
                f"held back from {key[1]} (Postfix would defer all its mail)"))
        elif set(p.tafile) & set(unknown):
            path = sorted(set(p.tafile) & set(unknown))[0]
            out[p.ref] = (CHECK_UNAVAILABLE, (
                f"could not check tafile {path} in pod {pod.name} ({unknown[path]}): this "
                f"policy's lines are held back from {key[1]} until the check can run"))
    return TrustCheck(out, retry=bool(unknown))
