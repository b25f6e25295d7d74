"""Running probes in a pod through the PodRunner seam (the only I/O of the probe package)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

from .. import postfix
from ..podrunner import ExecResult, PodRef, PodRunner, PodRunnerError
from .argv import ProbeTimeouts, probe_argv, probe_target
from .parse import SUMMARY_RE, TIMEOUT_WORDS, Output, classify, clean
from .results import (
    DNSSEC_UNAVAILABLE,
    ERROR,
    FAIL,
    HANDSHAKE_FAILED,
    NOT_PROBEABLE,
    PROTOCOL_MISMATCH,
    SKIPPED,
    TIMEOUT,
    ProbeOutcome,
    ProbeResult,
)
from .value import CLIENT_PARAMS, ClientDefaults, PolicyLike, TableValue, value_of


class ProbeSetupError(Exception):
    """The pod's Postfix settings could not be read; nothing was probed."""


async def read_client_defaults(runner: PodRunner, pod: PodRef, *,
                               timeout: float = 30.0) -> ClientDefaults:
    """Read :class:`ClientDefaults` from the pod with ``postconf -x``."""
    res = await runner.run(pod, postfix.postconf_get(CLIENT_PARAMS), timeout=timeout)
    if not res.ok:
        raise ProbeSetupError(f"{pod}: postconf: {res.message()}")
    return ClientDefaults.from_postconf(postfix.parse_postconf(res.stdout.decode("utf-8",
                                                                                 "replace")))


# -- running probes ----------------------------------------------------------------


def _outcome(key: str, res: ProbeResult, pod: PodRef | None) -> ProbeOutcome:
    return ProbeOutcome(key, res.result, res.reason, res.message, datetime.now(UTC),
                        str(pod) if pod is not None else "")


async def _run(runner: PodRunner, pod: PodRef, argv: Sequence[str],
               timeouts: ProbeTimeouts) -> ExecResult | ProbeResult:
    """Run one posttls-finger; a transport failure becomes a Fail result."""
    started = time.monotonic()
    deadline = timeouts.deadline
    try:  # not asyncio.wait_for: see mailtls_operator.aio (a lost cancellation)
        async with asyncio.timeout(deadline + 10.0):
            return await runner.run(pod, argv, timeout=deadline)
    except TimeoutError:
        return ProbeResult(FAIL, TIMEOUT, f"posttls-finger did not finish within {deadline:g}s")
    except PodRunnerError as exc:
        text = clean(str(exc))
        if (time.monotonic() - started >= deadline * 0.95 or "did not finish" in text
                or TIMEOUT_WORDS.search(text)):
            return ProbeResult(FAIL, TIMEOUT, text)
        return ProbeResult(FAIL, ERROR, text)


def _judge(res: ExecResult, level: str) -> ProbeResult:
    if res.returncode in (126, 127) and not res.stdout.strip():
        return ProbeResult(FAIL, ERROR, clean(f"posttls-finger is not available: "
                                              f"{res.message()}"))
    text = res.stdout.decode("utf-8", "replace") + "\n" + res.stderr.decode("utf-8", "replace")
    return classify(text, res.returncode, level)


async def probe_destination(runner: PodRunner, pod: PodRef,
                            policy: PolicyLike | TableValue | str,
                            key: str, *, timeouts: ProbeTimeouts | None = None,
                            defaults: ClientDefaults | None = None) -> ProbeOutcome:
    """Probe one policy key from ``pod``; never raises for what the probe finds.

    ``policy`` is a Policy or a table value (to probe what a table actually
    holds, e.g. the winner of a conflict).  ``defaults`` are the pod's
    :class:`ClientDefaults` (read them once per pod with
    :func:`read_client_defaults`; None means Postfix's built-in defaults, in
    particular no DNSSEC).  The runner runs the argv in the pod, where
    ``posttls-finger`` reads the pod's main.cf (the local runner sets
    ``MAIL_CONFIG``).  Raises ``InvalidArgument`` only for a value or key that
    must never become an argument.
    """
    t = timeouts or ProbeTimeouts()
    d = defaults or ClientDefaults()
    value = value_of(policy)
    if probe_target(key) is None:
        return _outcome(key, ProbeResult(SKIPPED, NOT_PROBEABLE,
                                         f"{key} matches every subdomain, not one server: "
                                         "probe a concrete destination instead"), pod)
    level = value.level
    if level in ("dane", "dane-only") and not d.dnssec:
        return await _dane_without_dnssec(runner, pod, value, key, t, d)

    argv = probe_argv(value, key, connect_timeout=t.connect, command_timeout=t.command,
                      defaults=d)
    ran = await _run(runner, pod, argv, t)
    if isinstance(ran, ProbeResult):
        return _outcome(key, ran, pod)
    verdict = _judge(ran, level)
    if verdict.reason == HANDSHAKE_FAILED and "-p" in argv:
        verdict = await _protocol_check(runner, pod, value, key, t, d, verdict)
    return _outcome(key, verdict, pod)


async def _protocol_check(runner: PodRunner, pod: PodRef, value: TableValue, key: str,
                          t: ProbeTimeouts, d: ClientDefaults,
                          verdict: ProbeResult) -> ProbeResult:
    """A failed handshake under a protocol restriction: does it succeed without it?"""
    argv = probe_argv(value, key, connect_timeout=t.connect,
                      command_timeout=t.command, defaults=d, restrict_protocols=False)
    ran = await _run(runner, pod, argv, t)
    if isinstance(ran, ProbeResult):
        return verdict
    summary = Output.parse(ran.stdout.decode("utf-8", "replace")).find(SUMMARY_RE)
    if summary is None:
        return verdict
    protocols = value.protocols or d.mandatory_protocols or d.protocols
    return ProbeResult(FAIL, PROTOCOL_MISMATCH, clean(
        f"{verdict.message}; without protocols={protocols} the handshake succeeds: "
        f"{summary.group('detail').split(' with cipher')[0]}"))


async def _dane_without_dnssec(runner: PodRunner, pod: PodRef, value: TableValue, key: str,
                               t: ProbeTimeouts, d: ClientDefaults) -> ProbeOutcome:
    setting = f"smtp_dns_support_level = {d.dns_support_level or '(empty)'}"
    if value.level == "dane-only":
        return _outcome(key, ProbeResult(FAIL, DNSSEC_UNAVAILABLE, clean(
            f"{setting}: dane-only needs DNSSEC lookups; Postfix defers all mail for this "
            "destination (client TLS configuration problem)")), pod)
    as_may = replace(value, level="may", match=(), tafile=())
    argv = probe_argv(as_may, key, connect_timeout=t.connect,
                      command_timeout=t.command, defaults=d)
    ran = await _run(runner, pod, argv, t)
    seen = ran if isinstance(ran, ProbeResult) else _judge(ran, "may")
    return _outcome(key, ProbeResult(FAIL, DNSSEC_UNAVAILABLE, clean(
        f"{setting}: dane needs DNSSEC lookups; Postfix uses may instead "
        f"({seen.reason}: {seen.message})")), pod)


class ProbeablePolicy(PolicyLike, Protocol):
    """A policy with its table keys (``policy.Policy``)."""

    @property
    def keys(self) -> tuple[str, ...]: ...


async def probe_policy(runner: PodRunner, pod: PodRef, policy: ProbeablePolicy, *,
                       concurrency: int = 4, timeouts: ProbeTimeouts | None = None,
                       defaults: ClientDefaults | None = None,
                       keys: Iterable[str] | None = None) -> list[ProbeOutcome]:
    """Probe every key of ``policy`` (or ``keys``) from ``pod``, ``concurrency`` at a time.

    Reads the pod's :class:`ClientDefaults` first unless given (raises
    :class:`ProbeSetupError` if ``postconf`` fails).  Keys that reach the
    same server (an IDN's A-label and U-label) are probed once.  Outcomes
    come back in key order.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if defaults is None:
        defaults = await read_client_defaults(runner, pod)
    wanted = list(policy.keys if keys is None else keys)
    sem = asyncio.Semaphore(concurrency)
    by_target: dict[str, asyncio.Task[ProbeOutcome]] = {}

    async def one(key: str) -> ProbeOutcome:
        async with sem:
            return await probe_destination(runner, pod, policy, key, timeouts=timeouts,
                                           defaults=defaults)

    tasks: list[tuple[str, asyncio.Task[ProbeOutcome]]] = []
    for key in wanted:
        target = probe_target(key) or key
        task = by_target.get(target)
        if task is None:
            task = by_target[target] = asyncio.ensure_future(one(key))
        tasks.append((key, task))
    try:
        done = [(key, await task) for key, task in tasks]
    finally:
        for task in by_target.values():
            task.cancel()
    return [out if out.destination == key else replace(out, destination=key)
            for key, out in done]
