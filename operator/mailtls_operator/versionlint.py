"""Reading an instance's ``mail_version`` (``postconf -x``) for the version lint.

Thin I/O around :mod:`.versions`: one ``postconf`` per instance and pod, cached
by pod uid (a new pod may run a new image), through the ``PodRunner`` seam.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from . import postfix
from .podrunner import PodRef, PodRunner
from .versions import REASON, _Valued, held_back

log = logging.getLogger(__name__)


class VersionLint:
    """Per instance: (pod uid, mail_version) of the pod last asked."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.seen: dict[tuple[str, str], tuple[str, str]] = {}

    async def mail_version(self, runner: PodRunner, key: tuple[str, str], pod: PodRef,
                           uid: str) -> str:
        """The instance's ``mail_version``, or "" when it cannot be read (nothing held)."""
        cached = self.seen.get(key)
        if cached is not None and cached[0] == uid:
            return cached[1]
        try:
            res = await runner.run(pod, postfix.postconf_get(["mail_version"]),
                                        timeout=self.timeout)
        except Exception as exc:  # a lint must never stop a rollout
            log.warning("%s/%s: cannot read mail_version: %s", *key, exc)
            return ""
        version = postfix.parse_postconf(res.stdout.decode("utf-8", "replace")).get(
            "mail_version", "") if res.ok else ""
        self.seen[key] = (uid, version)
        return version

    async def hold(self, runner: PodRunner, key: tuple[str, str],
                   pod: tuple[PodRef, str] | None,
                   policies: Iterable[_Valued], warnings: dict[str, list[tuple[str, str]]]
                   ) -> dict[str, str]:
        """ref -> message for the policies the instance's Postfix cannot parse; each is
        also added to ``warnings`` as ``UnsupportedAttribute`` (shown in its status)."""
        if pod is None:
            return {}
        held = held_back(policies, await self.mail_version(runner, key, *pod), key[1])
        for ref, message in held.items():
            warnings.setdefault(ref, []).append((REASON, message))
        return held
