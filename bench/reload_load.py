"""Reload under load: mail through a real Postfix while the operator re-rolls its tables.

One local Postfix instance, a kwok pod of instance ``relay`` on the real kube-apiserver
(the operator's commands reach it as execs through the server), routes ``load.test`` to
a plain SMTP sink (no STARTTLS) on loopback; a MailTLSPolicy puts the sink's next-hop on
``may``. A client submits mail as fast as Postfix accepts it (10 messages per SMTP
connection, so smtpd processes come and go across reloads). First a quiet phase (the
baseline: no rollout), then ~20 s during which another policy changes every ~2 s, so the
operator renders a new revision and rolls it into the pod (write, postmap, swap,
``postfix reload``, verify). Afterwards the queue is drained and every accepted message
is accounted for: delivered (logged ``status=sent`` and received by the sink), deferred,
bounced, still queued, lost (accepted, never delivered, not queued: must be 0),
duplicated.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import threading
import time
import uuid
from email.message import EmailMessage
from email.policy import SMTP
from functools import partial
from typing import Any

from bench.common import Result, Summary, postfix_available, stats, table
from bench.harness import (
    API_SERVER_NOTE,
    Env,
    bench_config,
    create_many,
    local_pods,
    operating,
    policy,
)
from mailtls_operator import postfix
from testbed import LocalInstance, Received, SmtpSink

NAME = "reload_under_load"
BASELINE_S = 6.0
LOAD_S = 20.0
WHATIF_S = 10.0
REROLL_EVERY_S = 2.0
PER_CONNECTION = 10
DRAIN_TIMEOUT = 60.0
_MSGID = re.compile(rb"^Message-ID:\s*<([^>]+)>", re.MULTILINE | re.IGNORECASE)


class TimedSink(SmtpSink):
    """A plain sink that also notes when each message arrived."""

    def __init__(self) -> None:
        super().__init__(name="plain-load")
        self.arrivals: list[tuple[float, Received]] = []

    def _record(self, msg: Received) -> None:
        self.arrivals.append((time.perf_counter(), msg))
        super()._record(msg)


class Sender(threading.Thread):
    """Submits mail back to back until stopped; remembers what was accepted, and when."""

    def __init__(self, inst: LocalInstance) -> None:
        super().__init__(name="smtp-sender", daemon=True)
        self.inst = inst
        self.stop_flag = threading.Event()
        self.accepted: dict[str, tuple[float, str]] = {}  # Message-ID -> (accepted at, qid)
        self.refused: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stop_flag.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.inst.smtpd_port, timeout=10) as smtp:
                    smtp.ehlo("client.mailtls.test")
                    for _ in range(PER_CONNECTION):
                        if self.stop_flag.is_set():
                            break
                        self._one(smtp, n)
                        n += 1
            except (OSError, smtplib.SMTPException) as exc:
                self.refused.append(f"{n}: {exc}")
                time.sleep(0.05)

    def _one(self, smtp: smtplib.SMTP, n: int) -> None:
        msgid = f"{uuid.uuid4().hex}@mailtls.test"
        msg = EmailMessage()
        msg["From"] = "sender@mailtls.test"
        msg["To"] = f"user{n}@load.test"
        msg["Subject"] = f"load {n}"
        msg["Message-ID"] = f"<{msgid}>"
        msg.set_content("hello\n")
        code, resp = smtp.mail("sender@mailtls.test")
        if code != 250:
            self.refused.append(f"{n}: MAIL {code}")
            smtp.rset()
            return
        code, resp = smtp.rcpt(f"user{n}@load.test")
        if code not in (250, 251):
            self.refused.append(f"{n}: RCPT {code}")
            smtp.rset()
            return
        code, resp = smtp.data(msg.as_bytes(policy=SMTP))
        qid = postfix.queue_id_from_reply(resp.decode("utf-8", "replace"))
        if code != 250 or qid is None:
            self.refused.append(f"{n}: DATA {code} {resp!r}")
            return
        self.accepted[msgid] = (time.perf_counter(), qid)


def run() -> Result:
    result = Result(NAME, "Reload under load: mail through real Postfix during re-rolls")
    why = postfix_available()
    if why:
        result.skipped = why
        print(f"skipped: {why}")
        return result
    sink = TimedSink()
    sink.start()
    try:
        asyncio.run(_scenario(result, sink))
    finally:
        sink.stop()
    return result


async def _scenario(result: Result, sink: TimedSink) -> None:
    config = bench_config(debounce=0.1, max_delay=1.0)
    result.config = {"baseline_s": BASELINE_S, "load_s": LOAD_S,
                     "reroll_every_s": REROLL_EVERY_S, "per_connection": PER_CONNECTION,
                     "debounce_s": config.debounce, "policy": "may", "sink": "plain",
                     "api_server": API_SERVER_NOTE}
    with local_pods(1, routes={"load.test": f"smtp:{sink.nexthop}"},
                    extra_main_cf={"enable_long_queue_ids": "yes"}) as pods:
        inst = pods.instances[pods.names[0]]

        def seed(env: Env) -> None:
            create_many(env.client, env.ns, [
                policy("sink", destinations=[sink.nexthop], level="may"),
                policy("filler", **_filler(0))])

        async with operating(config, pods, seed=seed) as env:
            runner = env.runner
            await env.until(lambda: env.entries() == 3
                            and env.pods_on(env.revision() or "", pods.names), 60)
            await env.settle()
            sender = Sender(inst)
            sender.start()
            try:
                t0 = time.perf_counter()
                await asyncio.sleep(BASELINE_S)
                t1 = time.perf_counter()
                rerolls = await _reroll(env, pods.names, t1 + LOAD_S)
                t2 = time.perf_counter()
                await asyncio.to_thread(_force_reload, env, pods.names)
                rerolls_whatif = await _reroll(env, pods.names, t2 + WHATIF_S, first=100)
                t3 = time.perf_counter()
            finally:
                sender.stop_flag.set()
                await asyncio.to_thread(sender.join, 30)
            counts = await asyncio.to_thread(_account, inst, sink, sender)
            reloads = sum(1 for s in runner.between(t1, t2) if s.kind == "reload")
            forced = sum(1 for s in runner.between(t2, t3) if s.kind == "reload")

    phases = {"quiet (baseline)": (t0, t1), "re-rolling every ~2 s (rename, no reload)": (t1, t2),
              "re-rolling, reload forced (mailtls.io/reload)": (t2, t3)}
    rows: list[dict[str, Any]] = []
    for label, (a, b) in phases.items():
        accepted = [t for t, _ in sender.accepted.values() if a <= t < b]
        arrived = [t for t, _ in sink.arrivals if a <= t < b]
        lat = [d for t, d in counts["latencies"] if a <= t < b]
        ls = stats(lat)
        rows.append({"phase": label, "seconds": b - a, "accepted_per_s": len(accepted) / (b - a),
                     "delivered_per_s": len(arrived) / (b - a), "latency_p50_s": ls.get("p50"),
                     "latency_p95_s": ls.get("p95")})
    counts.pop("latencies")
    result.rows += rows
    result.rows.append({**counts, "rerolls_verified": rerolls, "reloads": reloads,
                        "rerolls_verified_forced": rerolls_whatif, "reloads_forced": forced})
    print(table(("phase", "seconds", "accepted msg/s", "delivered msg/s", "latency p50 s",
                 "latency p95 s"),
                [(r["phase"], r["seconds"], r["accepted_per_s"], r["delivered_per_s"],
                  r["latency_p50_s"], r["latency_p95_s"]) for r in rows]))
    print(table(("sent (accepted)", "delivered", "deferred", "bounced", "queued", "lost",
                 "duplicates", "refused", "re-rolls verified", "postfix reloads"),
                [(counts["sent"], counts["delivered"], counts["deferred"], counts["bounced"],
                  counts["queued"], counts["lost"], counts["duplicates"], counts["refused"],
                  f"{rerolls} + {rerolls_whatif} forced", f"{reloads} + {forced} forced")]))
    base, load, whatif = rows
    result.summary += [
        Summary(NAME, "delivered msg/s while re-rolling", load["delivered_per_s"], "msg/s",
                base["delivered_per_s"], "quiet"),
        Summary(NAME, "delivery latency p95 while re-rolling", load["latency_p95_s"], "s",
                base["latency_p95_s"], "quiet", "<= 0.05 s",
                load["latency_p95_s"] is not None and load["latency_p95_s"] <= 0.05),
        Summary(NAME, "  same, with postfix reload forced", whatif["latency_p95_s"], "s",
                base["latency_p95_s"], "quiet"),
        Summary(NAME, f"sent / re-rolls verified ({rerolls})", counts["sent"], "msgs"),
        Summary(NAME, "lost (accepted, never delivered)", counts["lost"], "msgs", None, "",
                "= 0", counts["lost"] == 0),
        Summary(NAME, "deferred + bounced", counts["deferred"] + counts["bounced"], "msgs",
                None, "", "= 0", counts["deferred"] + counts["bounced"] == 0),
    ]
    result.notes.append("DESIGN §7: a TLS-policy-only change of an lmdb table is renamed into "
                        "place without `postfix reload`; the last phase annotates the pod "
                        "mailtls.io/reload=true, so every re-roll reloads (the old behaviour)")
    result.notes.append("latency: SMTP accept at the Postfix pod -> received by the sink; "
                        "throughput counts each phase's own accepts and arrivals")


def _force_reload(env: Env, pods: list[str]) -> None:
    import kubernetes.client

    core = kubernetes.client.CoreV1Api(env.client)
    for name in pods:
        core.patch_namespaced_pod(name, env.ns,
                                  {"metadata": {"annotations": {"mailtls.io/reload": "true"}}})


def _filler(k: int) -> dict[str, Any]:
    return {"destinations": [f"reroll{k}.example", f".reroll{k}.example"], "level": "encrypt"}


def _moved_on(env: Env, old: str | None) -> str | None:
    """The ConfigMap's revision once it is no longer ``old``."""
    rev = env.revision()
    return rev if rev not in (None, old) else None


async def _reroll(env: Env, pods: list[str], until: float, first: int = 0) -> int:
    """Change the filler policy every ~2 s until ``until``; count revisions verified."""
    revisions: list[str] = []
    k = first
    while time.perf_counter() < until:
        k += 1
        started = time.perf_counter()
        old = env.revision()
        await asyncio.to_thread(env.replace_spec_sync, env.ns, "filler", _filler(k))
        try:
            rev = await env.until(partial(_moved_on, env, old), 10)
            await env.until(partial(env.pods_on, rev, pods), 15)
            revisions.append(rev)
        except TimeoutError:
            pass
        await asyncio.sleep(max(0.0, REROLL_EVERY_S - (time.perf_counter() - started)))
    return len(revisions)


def _account(inst: LocalInstance, sink: TimedSink, sender: Sender) -> dict[str, Any]:
    """Drain the queue and account for every accepted message."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while len(sink.arrivals) < len(sender.accepted) and time.monotonic() < deadline:
        time.sleep(0.1)
    # A reload restarts qmgr while smtp(8) is mid-delivery; a finished message can then
    # stay in incoming until the next queue scan (tests/postfix/test_reload_under_load.py).
    inst.flush()
    end = time.monotonic() + 10
    while inst.queue() and time.monotonic() < end:
        time.sleep(0.05)
    got: dict[str, int] = {}
    latencies = []
    for at, msg in sink.arrivals:
        m = _MSGID.search(msg.data)
        if m is None:
            continue
        msgid = m.group(1).decode()
        got[msgid] = got.get(msgid, 0) + 1
        if msgid in sender.accepted and got[msgid] == 1:
            sent_at = sender.accepted[msgid][0]
            latencies.append((sent_at, at - sent_at))
    statuses: dict[str, set[str]] = {}
    for d in inst.deliveries():
        statuses.setdefault(d.queue_id, set()).add(d.status)
    queued = {m["queue_id"] for m in inst.queue()}
    # Per message, by Message-ID (queue ids are long ones here, never reused).
    accepted = sender.accepted
    delivered = {mid for mid, (_, qid) in accepted.items()
                 if got.get(mid) and "sent" in statuses.get(qid, set())}
    deferred = {mid for mid, (_, qid) in accepted.items()
                if "deferred" in statuses.get(qid, set())}
    bounced = {mid for mid, (_, qid) in accepted.items()
               if statuses.get(qid, set()) & {"bounced", "expired"}}
    still = {mid for mid, (_, qid) in accepted.items() if qid in queued}
    lost = set(accepted) - delivered - still
    return {"sent": len(sender.accepted), "delivered": len(delivered), "deferred": len(deferred),
            "bounced": len(bounced), "queued": len(still), "lost": len(lost),
            "unsolicited": sum(1 for mid in got if mid not in accepted),
            "duplicates": sum(n - 1 for n in got.values() if n > 1),
            "refused": len(sender.refused), "refused_sample": sender.refused[:5],
            "latencies": latencies}
