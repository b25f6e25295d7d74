"""What the pods see: probes of each destination, and mail stuck for a TLS reason.

Runs beside the rollout, never in its way: after each rollout and on a
schedule, one ready pod of the instance probes the destinations of its
policies with ``posttls-finger`` (audit-mode policies included: that is their
whole point), and every ready pod's queue is read with ``postqueue -j``.
Recipients deferred for a TLS reason are attributed to the table key that
governs their next-hop; when a rollout changed a key's line, the messages
deferred under it are scheduled at once (``postqueue -i``), so fixing a
policy delivers stuck mail in seconds instead of at Postfix's next retry.
No Kubernetes imports: the controller passes pods and writes status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from . import mailqueue, postfix, probe
from .outcomes import KeyOutcomes
from .podrunner import PodRef, PodRunner
from .policy import Policy
from .routing import InstanceConfig

log = logging.getLogger("mailtls.observer")



@dataclass
class PolicyProbes:
    """The last probe of one policy from one instance."""

    value: str  # the policy value probed: a changed policy is probed again
    at: datetime
    outcomes: list[probe.ProbeOutcome]


@dataclass
class Observations:
    """Per instance: probes by policy ref, TLS-deferred mail by table key, and (agent
    strategy, TLSRPT) TLS session outcomes by governing key."""

    probes: dict[str, PolicyProbes] = field(default_factory=dict)
    deferred: dict[str, mailqueue.DeferredSummary] = field(default_factory=dict)
    released: int = 0
    outcomes: dict[str, KeyOutcomes] = field(default_factory=dict)
    outcome_window: int = 0
    collector_error: str = ""
    """Why an agent of the instance cannot receive Postfix's TLSRPT datagrams, if one says."""


async def _transport_routes(runner: PodRunner, pod: PodRef, config: InstanceConfig,
                            domains: Sequence[str], timeout: float) -> dict[str, str]:
    """domain -> transport value, looked up in the instance's own transport_maps, in order
    (the site's routes decide next-hops too, not only the operator's table)."""
    found: dict[str, str] = {}
    if not domains:
        return found
    for spec in config.transport_tables:
        map_type, sep, path = spec.partition(":")
        if not sep or map_type not in postfix.MAP_TYPES:
            continue
        wanted = [d for d in domains if d not in found]
        if not wanted:
            break
        res = await runner.run(pod, postfix.postmap_query_stdin(map_type, path),
                               stdin="".join(f"{d}\n" for d in wanted).encode(),
                               timeout=timeout)
        for line in res.stdout.decode("utf-8", "replace").splitlines():
            key, _, value = line.partition("\t")
            if key and value and key not in found:
                found[key] = value.strip()
    return found


async def read_deferred(runner: PodRunner, pod: PodRef, config: InstanceConfig,
                        table_keys: Iterable[str], *, timeout: float = 60.0
                        ) -> dict[str, mailqueue.DeferredSummary]:
    """This pod's TLS-deferred recipients by governing key."""
    records = await mailqueue.read_queue(runner, pod, timeout=timeout)
    domains = sorted({r.domain for rec in records for r in rec.recipients
                      if r.delay_reason and mailqueue.is_tls_reason(r.delay_reason)})
    routes = await _transport_routes(runner, pod, config, domains, timeout)
    return mailqueue.deferred_by_key(records, table_keys, config, routes)


async def observe_queues(runner: PodRunner, pods: Sequence[PodRef], config: InstanceConfig,
                         table_keys: Iterable[str], release_keys: Iterable[str], *,
                         timeout: float = 60.0) -> tuple[dict[str, mailqueue.DeferredSummary],
                                                         int]:
    """Read every pod's queue; release what ``release_keys`` governs.  Returns the deferred
    mail still waiting (merged over pods) and how many messages were released."""
    keys = list(table_keys)
    release = set(release_keys)
    per_pod = []
    released = 0
    for pod in pods:
        try:
            deferred = await read_deferred(runner, pod, config, keys, timeout=timeout)
        except Exception as exc:  # observing must never break the operator
            log.warning("%s: cannot read the queue: %s", pod, exc)
            continue
        ids = mailqueue.releasable_ids(deferred, release) if release else []
        if ids:
            outcomes = await mailqueue.release(runner, pod, ids, timeout=timeout)
            released += sum(1 for o in outcomes if o.ok)
            log.info("%s: released %d message(s) deferred under changed keys %s", pod,
                     len(ids), ", ".join(sorted(release & set(deferred))))
            deferred = {k: v for k, v in deferred.items() if k not in release}
        per_pod.append(deferred)
    return mailqueue.merge_deferred(*per_pod), released


def due_probes(policies: Sequence[Policy], known: Mapping[str, PolicyProbes], now: datetime,
               interval: float) -> list[Policy]:
    """The policies that changed since their last probe, or whose probe is older than
    ``interval`` seconds (0: only after changes)."""
    return [p for p in policies
            if (last := known.get(p.ref)) is None or last.value != p.value
            or (interval > 0 and (now - last.at).total_seconds() >= interval)]


async def probe_policies(runner: PodRunner, pod: PodRef, policies: Sequence[Policy],
                         defaults: probe.ClientDefaults, now: datetime, *,
                         concurrency: int = 4, timeouts: probe.ProbeTimeouts | None = None
                         ) -> dict[str, PolicyProbes]:
    """Probe ``policies`` (the due ones: :func:`due_probes`) with the smtp client's
    defaults read in the same cycle."""
    out: dict[str, PolicyProbes] = {}
    due = list(policies)
    sem = asyncio.Semaphore(concurrency)  # policies in parallel, not only a policy's keys

    async def one(policy: Policy) -> None:
        async with sem:
            try:
                outcomes = await probe.probe_policy(runner, pod, policy, concurrency=2,
                                                    timeouts=timeouts, defaults=defaults)
            except Exception as exc:
                log.warning("%s: probing %s failed: %s", pod, policy.ref, exc)
                return
            out[policy.ref] = PolicyProbes(policy.value, now, outcomes)

    await asyncio.gather(*(one(p) for p in due))
    return out
