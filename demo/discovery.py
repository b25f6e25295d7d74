"""The discovery part of ``make demo``: a partner's published MTA-STS policy becomes a line.

A local authoritative DNS server and an HTTPS server (certificate from a local
CA) publish two partners: ``partner.example`` in MTA-STS mode ``enforce`` with
MX pattern ``*.partner.example``, and ``testing.example`` in mode ``testing``
whose MX host presents a certificate for another name.  ``mailtls discover``
(as root: the real CLI, on port 443 of a loopback address) prints the line the
operator would write; the line goes into a real Postfix instance and real mail
is delivered over a verified connection; the testing-mode line is probed with
``posttls-finger`` against the MX host and reported as "would fail".
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from mailtls_operator import probe
from mailtls_operator.discovery.dns import Dns
from mailtls_operator.discovery.engine import Discoverer
from mailtls_operator.discovery.entries import entries
from mailtls_operator.discovery.fetch import ssl_context
from mailtls_operator.discovery.report import describe
from mailtls_operator.podrunner import PodRef
from mailtls_operator.render import render
from mailtls_operator.rollout import PodTarget, TableSet, apply_to_pod
from testbed import (
    InstanceSettings,
    LocalCA,
    LocalInstance,
    LocalPodRunner,
    starttls_sink,
)
from testbed.stsworld import StsWorld

ADDRESS = "127.0.84.43"


def _show(text: str) -> None:
    for line in text.rstrip("\n").splitlines():
        print(f"   {line}", flush=True)


def _cli(world: StsWorld) -> None:
    """The real ``mailtls discover`` against the world (port 443 needs root)."""
    argv = [sys.executable, "-m", "mailtls_operator.cli", "discover", "partner.example",
            "testing.example", "--nameserver", world.nameserver, "--ca-file", world.ca_file]
    print(f"   $ mailtls discover partner.example testing.example --nameserver "
          f"{world.nameserver} --ca-file {world.ca_file}")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60,  # noqa: S603
                          check=False)  # argv of constants and our own world's values
    print(f"   stdout (exit {done.returncode}):")
    _show(done.stdout)
    print("   stderr:")
    _show(done.stderr)


async def run(base: Path, step: object) -> None:
    """One section of the demo; ``step`` prints a section title."""
    root = os.geteuid() == 0
    ca = LocalCA(base / "discovery-ca")
    good = starttls_sink(base / "discovery-certs", name="mx-partner",
                         hostname="mx.partner.example", ca=ca).start()
    wrong = starttls_sink(base / "discovery-certs", name="mx-testing",
                          hostname="other-name.example", ca=ca).start()
    inst = LocalInstance(base / "discovery-relay", InstanceSettings(
        name="discovery-relay", hosts={"partner.example": "127.0.0.1"},
        smtp_tcp_port=good.port, extra_main_cf={"smtp_tls_CAfile": str(ca.pem_path)}))
    try:
        with StsWorld(["mta-sts.partner.example", "mta-sts.testing.example"],
                      address=ADDRESS if root else "127.0.0.1",
                      https_port=443 if root else 0) as world:
            world.publish_sts("partner.example", id="20261201", mx=["*.partner.example"])
            world.publish_sts("testing.example", id="1", mode="testing",
                              mx=["*.testing.example"])
            step("13. Discovery: MTA-STS published in a local DNS + HTTPS world "  # type: ignore[operator]
                 f"(DNS {world.nameserver}, HTTPS port {world.https_port})")
            if root:
                await asyncio.to_thread(_cli, world)
            discoverer = Discoverer(Dns(parse(world.nameserver), timeout=5.0),
                                    ssl_context(world.ca_file),
                                    https_port=None if root else world.https_port)
            now = datetime.now(UTC)
            states = await discoverer.discover_all(["partner.example", "testing.example"], now,
                                                   ["mta-sts"])
            if not root:
                for state in states:
                    for line in describe(state):
                        print(f"   {line}")
            found = entries(states, namespace="mail", name="partners")
            tables = TableSet.of(render(found, instance=("mail", "discovery-relay"), now=now))
            inst.create()
            inst.start()
            runner = LocalPodRunner()
            pod = PodRef("mail", "discovery-relay")
            runner.add(pod, inst)
            target = PodTarget(pod, map_path=str(inst.map_path), map_type="lmdb",
                               configmap_dir=str(inst.configmap_dir))
            assert (await apply_to_pod(runner, target, tables, timeout=20)).ok
            print(f"   rolled out; postmap -q partner.example -> "
                  f"{inst.query('partner.example')}; testing.example -> "
                  f"{inst.query('testing.example')} (testing mode: never written)")
            qid = inst.submit("user@partner.example")
            attempt = await asyncio.to_thread(inst.wait_for_delivery, qid)
            line = await asyncio.to_thread(inst.wait_for_log, r"Verified TLS connection")
            print(f"   mail to user@partner.example: {attempt.status} ({attempt.dsn}); "
                  f"{line.split(': ', 1)[-1][:100]}")
            [testing] = [p for p in found if p.mode == "audit"]
            defaults = await probe.read_client_defaults(runner, pod)
            out = await probe.probe_destination(runner, pod, testing.value,
                                                f"[127.0.0.1]:{wrong.port}", defaults=defaults)
            verdict = "would pass" if out.result == "Pass" else "would fail"
            print(f"   testing.example (mode testing, MX host [127.0.0.1]:{wrong.port} with a "
                  f"certificate for other-name.example), probed with {testing.value!r}: "
                  f"{verdict} if enforced: {out.reason}: {out.message[:120]}")
    finally:
        inst.stop()
        good.stop()
        wrong.stop()


def parse(nameserver: str) -> tuple[str, int]:
    host, _, port = nameserver.rpartition(":")
    return host, int(port)
