"""Reading an instance's ``mail_version`` (``postconf -x``) for the version lint.

Thin I/O around :mod:`.versions`: one ``postconf`` per instance and pod, cached
by pod uid (a new pod may run a new image), through the ``PodRunner`` seam.  In
agent mode nothing is run: the agent's report carries the same values (its
``facts``, read with ``postconf -x`` in the pod), so the lint runs there too.
The same values give the deprecated-parameter lint (``DeprecatedParameter``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from . import postfix
from .facts import InstanceFacts
from .podrunner import PodRef, PodRunner
from .versions import (
    DEPRECATED_REASON,
    LINT_PARAMS,
    REASON,
    _Valued,
    deprecated_settings,
    held_back,
)

log = logging.getLogger(__name__)


class VersionLint:
    """Per instance: (pod uid, the lint's postconf values) of the pod last asked."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.seen: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}

    async def values(self, runner: PodRunner, key: tuple[str, str], pod: PodRef,
                     uid: str) -> dict[str, str]:
        """The instance's :data:`~.versions.LINT_PARAMS`, or {} when they cannot be read."""
        cached = self.seen.get(key)
        if cached is not None and cached[0] == uid:
            return cached[1]
        try:
            res = await runner.run(pod, postfix.postconf_get(LINT_PARAMS), timeout=self.timeout)
        except Exception as exc:  # a lint must never stop a rollout
            log.warning("%s/%s: cannot read mail_version: %s", *key, exc)
            return {}
        values = postfix.parse_postconf(res.stdout.decode("utf-8", "replace")) if res.ok else {}
        self.seen[key] = (uid, values)
        return values

    async def mail_version(self, runner: PodRunner, key: tuple[str, str], pod: PodRef,
                           uid: str) -> str:
        """The instance's ``mail_version``, or "" when it cannot be read (nothing held)."""
        return (await self.values(runner, key, pod, uid)).get("mail_version", "")

    async def hold(self, runner: PodRunner, key: tuple[str, str],
                   pod: tuple[PodRef, str] | None,
                   policies: Iterable[_Valued], warnings: dict[str, list[tuple[str, str]]],
                   reported: InstanceFacts | None = None) -> dict[str, str]:
        """ref -> message for the policies the instance's Postfix cannot parse; each is
        also added to ``warnings`` as ``UnsupportedAttribute`` (shown in its status).

        ``pod`` (and its uid) is asked by exec; without one, ``reported`` (the facts an
        agent reported) is used.  Every policy also gets a ``DeprecatedParameter``
        warning per deprecated TLS parameter the instance sets."""
        values: Mapping[str, str]
        if pod is not None:
            values = await self.values(runner, key, *pod)
        elif reported is not None:
            values = reported.values
        else:
            return {}
        policies = list(policies)
        held = held_back(policies, values.get("mail_version", ""), key[1])
        for ref, message in held.items():
            warnings.setdefault(ref, []).append((REASON, message))
        for message in deprecated_settings(values):
            for p in policies:
                warnings.setdefault(p.ref, []).append((DEPRECATED_REASON, message))
        return held
