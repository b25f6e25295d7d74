"""One ``postconf -x`` per cycle: the facts of an instance that routing and probes need.

The rollout's lint and the queue attribution need the routing parameters
(:class:`~.routing.InstanceConfig`); the probes need the smtp(8) client's TLS
defaults (:class:`~.probe.ClientDefaults`).  Both come from the same pod's
main.cf, so one exec reads them together and each side takes its view.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from . import postfix
from .podrunner import PodRef, PodRunner
from .probe import CLIENT_PARAMS, ClientDefaults
from .routing import ROUTING_PARAMS, InstanceConfig
from .tlsrpt import TLSRPT_PARAMS
from .versions import LINT_PARAMS

FACT_PARAMS: Final = tuple(dict.fromkeys((*ROUTING_PARAMS, *CLIENT_PARAMS, *LINT_PARAMS,
                                          *TLSRPT_PARAMS)))
"""With ``mail_version`` and the deprecated TLS parameters: the agent's report carries
them, so the version lint runs in agent mode too; and the TLSRPT settings (a Postfix
without TLSRPT leaves ``smtp_tlsrpt_enable`` out: ``postconf -x`` skips unknown names),
from which the agent finds its socket and the operator lints an instance that could
report its TLS sessions but does not."""


class PostfixCommandError(Exception):
    """A read-only Postfix command in a pod failed; the message is Postfix's."""


@dataclass(frozen=True)
class InstanceFacts:
    """A snapshot of one pod's effective main.cf values (``name -> value``)."""

    values: Mapping[str, str] = field(default_factory=dict)

    @property
    def routing(self) -> InstanceConfig:
        return InstanceConfig.from_postconf(self.values)

    @property
    def client(self) -> ClientDefaults:
        return ClientDefaults.from_postconf(self.values)


async def read_facts(runner: PodRunner, pod: PodRef, *, timeout: float = 30.0
                     ) -> InstanceFacts:
    """Read :class:`InstanceFacts` from the pod with one ``postconf -x``."""
    res = await runner.run(pod, postfix.postconf_get(FACT_PARAMS), timeout=timeout)
    if not res.ok:
        raise PostfixCommandError(f"{pod}: postconf: {res.message()}")
    return InstanceFacts(postfix.parse_postconf(res.stdout.decode("utf-8", "replace")))


async def read_instance_config(runner: PodRunner, pod: PodRef, *,
                               timeout: float = 30.0) -> InstanceConfig:
    """A pod's effective routing settings (tests and the bench read only these)."""
    return (await read_facts(runner, pod, timeout=timeout)).routing
