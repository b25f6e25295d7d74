"""The controller: Kopf handlers feed the world; one worker per instance converges it.

Read top-down: :mod:`.handlers` (the only kopf import) -> :mod:`.conductor`
(:class:`Operator`: lifecycle, events, one convergence) -> :mod:`.worker`
(debounce per instance) -> :mod:`.trust`, :mod:`.store` (ConfigMaps),
:mod:`.rollouts` (pods), :mod:`.statuses` (status and Events, written by
:mod:`.statuswriter`),
:mod:`.observing` (probes and queues); :mod:`.context` and :mod:`.state` hold
what they share.
"""

from __future__ import annotations

from ..configmap import ANN_REVISION
from .conductor import CrdMissing, Operator
from .context import Config
from .handlers import build_registry, operator_options, register

__all__ = ["ANN_REVISION", "Config", "CrdMissing", "Operator", "build_registry", "operator_options",
           "register"]
