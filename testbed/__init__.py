"""Real Postfix on this machine, standing in for Postfix pods.

:mod:`.instance` runs throwaway Postfix instances (one directory each, no
``/etc/postfix``), :mod:`.sinks` runs SMTP servers on loopback that record what
they receive (with or without STARTTLS, self-signed or CA-issued certificates),
and :mod:`.runner` is the :class:`~mailtls_operator.podrunner.PodRunner` that
executes the operator's argv against those instances.  Used by the postfix
test suite and by ``make demo``: no pytest here.
"""

from __future__ import annotations

from .instance import (
    Delivery,
    InstanceSettings,
    LocalInstance,
    PostfixError,
    free_port,
    postfix_unavailable,
    running_instance,
    stop_all,
    wait_until,
)
from .runner import LocalPodRunner, RecordedCall
from .sinks import LocalCA, Received, SmtpSink, plain_sink, starttls_sink

__all__ = [
    "Delivery",
    "InstanceSettings",
    "LocalCA",
    "LocalInstance",
    "LocalPodRunner",
    "PostfixError",
    "Received",
    "RecordedCall",
    "SmtpSink",
    "free_port",
    "plain_sink",
    "postfix_unavailable",
    "running_instance",
    "starttls_sink",
    "stop_all",
    "wait_until",
]
