"""The agent's ConfigMap reader is total and bounded: any body gives a table or a refusal
(Unreadable / Malformed), a bomb is refused after inflating at most MAX_TABLE_BYTES, and
the agent's loop keeps its last good table, reports the refusal and keeps running."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailtls_operator.agent import desired
from mailtls_operator.agent.api import NotFound
from mailtls_operator.agent.converge import Converger, PodSettings
from mailtls_operator.agent.loop import Agent, LoopSettings
from mailtls_operator.configmap import (
    ANN_PARTS,
    ANN_REVISION,
    MANIFEST,
    MAX_TABLE_BYTES,
    TableTooLarge,
    Unreadable,
    configmap_bodies,
    reassemble,
)
from mailtls_operator.policy import load_policy
from mailtls_operator.render import Tables, render

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def _tables() -> Tables:
    pol = load_policy({"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy",
                       "metadata": {"name": "p", "namespace": "mail"},
                       "spec": {"destinations": ["a.example"], "level": "encrypt"}}, now=NOW)
    return render([pol], instance=("mail", "relay"), now=NOW)


def _gz_body(payload: bytes) -> dict[str, Any]:
    return {"metadata": {"name": "relay-mailtls", "annotations": {ANN_REVISION: "r"}},
            "binaryData": {"tls_policy.gz": base64.b64encode(payload).decode()}}


def _bomb(size: int) -> bytes:
    """gzip of ``size`` zero bytes, streamed (never holding ``size`` bytes)."""
    out = bytearray()
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    for _ in range(size // len(block)):
        out += z.compress(block)
    return bytes(out + z.flush())


def _split_bomb(size: int, parts: int = 3) -> list[dict[str, Any]]:
    """A primary and ``parts`` part ConfigMaps whose chunks join into a gzip bomb, with
    the right sha256 in the manifest: only the inflation bound can refuse it."""
    packed = _bomb(size)
    step = -(-len(packed) // parts)
    chunks = [packed[i:i + step] for i in range(0, len(packed), step)]
    manifest = "\n".join([f"chunks: {len(chunks)}", f"size: {len(packed)}",
                          f"sha256: {hashlib.sha256(packed).hexdigest()}"])
    primary = {"metadata": {"name": "relay-mailtls",
                            "annotations": {ANN_REVISION: "r", ANN_PARTS: str(len(chunks))}},
               "data": {f"tls_policy{MANIFEST}": manifest}}
    return [primary] + [
        {"metadata": {"name": f"relay-mailtls-part-{i + 1}", "annotations": {ANN_REVISION: "r"}},
         "binaryData": {f"tls_policy.gz.{i:03d}": base64.b64encode(c).decode()}}
        for i, c in enumerate(chunks)]


def test_one_corrupt_byte_in_the_gzip_is_a_refusal_not_a_zlib_error() -> None:
    packed = bytearray(gzip.compress(b"x" * 5000, mtime=0))
    for at in (0, 3, 12, len(packed) // 2, len(packed) - 5, len(packed) - 1):
        broken = bytearray(packed)
        broken[at] ^= 0xFF
        with pytest.raises(Unreadable):
            reassemble([_gz_body(bytes(broken))])
    with pytest.raises(Unreadable, match="truncated"):
        reassemble([_gz_body(bytes(packed[:-10]))])
    with pytest.raises(Unreadable, match="after the gzip"):
        reassemble([_gz_body(bytes(packed) + b"junk")])


def test_a_gzip_bomb_is_refused_after_inflating_the_bound_and_no_more() -> None:
    with pytest.raises(Unreadable, match=f"past {MAX_TABLE_BYTES}"):
        reassemble([_gz_body(_bomb(MAX_TABLE_BYTES + (2 << 20)))])


def test_a_split_bomb_with_a_correct_sha256_is_refused_within_300_mib() -> None:
    """In a child process under RLIMIT_AS, so an unbounded inflate would fail loudly."""
    code = (
        "import resource, sys\n"
        "from tests.unit.test_configmap_reader_bounded import _split_bomb\n"
        "from mailtls_operator.configmap import reassemble, Unreadable, MAX_TABLE_BYTES\n"
        "bodies = _split_bomb(4 * MAX_TABLE_BYTES)\n"
        "try:\n    reassemble(bodies)\nexcept Unreadable as e:\n    print('refused:', e)\n"
        # VmHWM, not ru_maxrss: Linux carries the parent's (pytest's) peak over exec
        "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0]\n"
        "print('peak', int(hwm.split()[1]) // 1024)\n")
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (900 << 20, 900 << 20))\n"
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", limit + code], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert "refused:" in out and "inflates past" in out
    peak_mib = int(out.rsplit("peak", 1)[1])
    assert peak_mib <= 300, out
    assert time.monotonic() - started < 30


def test_the_writer_refuses_a_table_past_the_readers_bound(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from mailtls_operator.configmap import layout

    monkeypatch.setattr(layout, "MAX_TABLE_BYTES", 100)
    layout.clear_cache()
    with pytest.raises(TableTooLarge, match="more than the 100"):
        configmap_bodies("mail", "relay", _tables())


@pytest.mark.parametrize("body", [
    {"metadata": [], "data": {}},
    {"metadata": {"annotations": ["x"]}},
    {"metadata": {"annotations": {ANN_REVISION: 5}}},
    {"metadata": {}, "data": ["tls_policy"]},
    {"metadata": {}, "data": {"tls_policy": 7}},
    {"metadata": {}, "data": {"tls_policy": None}},
    {"metadata": {}, "binaryData": {"tls_policy.gz": "not base64!"}},
    {"metadata": {}, "binaryData": 12},
    {"metadata": {}, "data": {f"tls_policy{MANIFEST}": "chunks: ²\nsha256: x"}},
    {"metadata": {}, "data": {f"tls_policy{MANIFEST}": "chunks: 99999999999\nsha256: x"}},
    {"metadata": {}, "data": {"tls_policy": "x", "agent.json": "[" * 5000}},
    {"metadata": {}, "data": {"tls_policy": "x", "agent.json": '{"probes": NaN}'}},
    [], None, "text", 3,
], ids=lambda b: repr(b)[:40])
def test_wrong_types_in_a_configmap_are_refused(body: Any) -> None:
    with pytest.raises(desired.Malformed):
        desired.from_configmaps([body])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=20)
field_names = st.sampled_from(["tls_policy", "tls_policy.gz", f"tls_policy{MANIFEST}",
                               "tls_policy.gz.000", "transport", "agent.json"])
bodies = st.fixed_dictionaries({}, optional={
    "metadata": st.one_of(json_values, st.fixed_dictionaries({}, optional={
        "name": json_values, "annotations": st.one_of(json_values, st.dictionaries(
            st.sampled_from([ANN_REVISION, ANN_PARTS]), json_values | st.text()))})),
    "data": st.one_of(json_values, st.dictionaries(field_names, st.text() | json_values)),
    "binaryData": st.one_of(json_values, st.dictionaries(field_names, st.one_of(
        st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),
        st.binary(max_size=200).map(lambda b: base64.b64encode(
            gzip.compress(b, mtime=0)).decode()),
        st.text(max_size=50)))),
})


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(bodies | json_values, min_size=1, max_size=3))
def test_any_configmap_body_gives_a_table_or_a_refusal(found: list[Any]) -> None:
    try:
        got = desired.from_configmaps(found)
    except desired.Malformed:
        return
    assert got.revision


@settings(max_examples=300, deadline=2000)
@given(st.binary(max_size=4096))
def test_any_bytes_as_the_compressed_table_give_text_or_a_refusal(raw: bytes) -> None:
    try:
        text = reassemble([_gz_body(raw)])
    except Unreadable:
        return
    assert isinstance(text, str)


# ------------------------------------------------------------------ the agent's loop


class _ScriptedApi:
    """The API server's side of the agent, scripted: a GET of the primary, then one
    watch whose events are the given objects; every later watch ends the test."""

    def __init__(self, first: dict[str, Any], events: list[Any]) -> None:
        self.first, self.events, self.watches = first, events, 0
        self.done = asyncio.Event()

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any]:
        if name != "relay-mailtls":
            raise NotFound(name)
        return self.first

    async def watch_configmap(self, namespace: str, name: str, resource_version: str, *,
                              timeout_seconds: int = 300
                              ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        self.watches += 1
        if self.watches == 1:
            for obj in self.events:
                yield "MODIFIED", obj
        else:
            self.done.set()
            await asyncio.Event().wait()  # the test cancels the agent here

    async def patch_pod_annotations(self, *args: Any, **kwargs: Any) -> None:
        return None


async def test_the_agent_keeps_its_last_good_table_and_runs_on_through_every_bad_configmap(
        ) -> None:
    good = configmap_bodies("mail", "relay", _tables())
    last_good = desired.from_configmaps(good)
    bad: list[Any] = [
        _gz_body(b"\x1f\x8b\x08\x00corrupt"),
        _gz_body(_bomb(MAX_TABLE_BYTES + (1 << 20))),
        {"metadata": {"annotations": ["not", "a", "map"]}},
        {"metadata": {"annotations": {ANN_PARTS: "99999"}}},
        {"metadata": {"annotations": {ANN_PARTS: "²"}}},
        {"metadata": [], "data": {"tls_policy": 3}},
        {"metadata": {}, "data": {"tls_policy": "x", "agent.json": "[" * 100_000}},
    ]
    converger = Converger(runner=None, settings=PodSettings(namespace="mail", pod="relay-0"))  # type: ignore[arg-type]
    converger.live = last_good
    api = _ScriptedApi(bad[0], bad[1:])
    agent = Agent(api, converger, LoopSettings(instance="relay", configmap_dir=Path("/nonexistent"),  # type: ignore[arg-type]
                                               observe_interval=0))
    errors: list[str] = []
    original = converger.refuse

    def refuse(why: str, source: str) -> None:
        errors.append(why)
        original(why, source)

    converger.refuse = refuse  # type: ignore[method-assign]
    task = asyncio.create_task(agent._follow())
    await asyncio.wait_for(api.done.wait(), timeout=30)
    assert not task.done(), "the agent's loop stopped"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(errors) == len(bad), errors
    assert converger.live is last_good
    assert converger.report.error == errors[-1]
