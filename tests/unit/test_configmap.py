"""The ConfigMaps of an instance: one while the tables fit, a primary and parts when not.

Every body must fit the API server's 1 MiB object limit, measured as the JSON sent
(``json.dumps`` with its default ASCII escaping: the larger, conservative figure).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from mailtls_operator import configmap
from mailtls_operator.configmap import (
    ANN_PARTS,
    ANN_REVISION,
    ANN_SHA256,
    COMPRESS_ABOVE,
    LABEL_INSTANCE,
    LABEL_PART,
    LIMIT,
    MANAGED_BY,
    OPERATOR,
    TableTooLarge,
    Unreadable,
    configmap_bodies,
    configmap_body,
    layout,
    merge_patch,
    part_name,
    part_number,
    reassemble,
    same_content,
    stale_parts,
)
from mailtls_operator.policy import load_policy
from mailtls_operator.render import Tables, render

from .test_policy import obj

NOW = datetime(2026, 11, 25, tzinfo=UTC)
Body = dict[str, Any]


@pytest.fixture(autouse=True)
def _cold_cache() -> Iterator[None]:
    """Tests that change CHUNK or MAX_PARTS must not see (or leave) remembered bodies."""
    configmap.clear_cache()
    yield
    configmap.clear_cache()


def synthetic(lines: int, seed: int = 1, value: str = "secure match=nexthop:dot-nexthop"
              ) -> str:
    """A table of random-looking keys: compresses ~6:1, like real domain names."""
    rng = random.Random(seed)
    return "".join(f"{rng.getrandbits(48):012x}.example {value}\n" for _ in range(lines))


def tables(tls: str, transport: str = "") -> Tables:
    revision = hashlib.sha256(f"{tls}\0{transport}".encode()).hexdigest()
    tls = f"# revision: {revision}\n{tls}"
    return Tables(revision=revision, tls_policy=tls, transport=transport, tls_entries={},
                  transport_entries={}, owners={})


def json_size(body: Body) -> int:
    return len(json.dumps(body).encode("utf-8"))


def check_set(bodies: list[Body], t: Tables) -> None:
    """What holds for every set: sizes, names, labels, revision, the round trip."""
    assert bodies[0]["metadata"]["name"] == "relay-mailtls"
    for number, body in enumerate(bodies):
        meta = body["metadata"]
        assert json_size(body) < LIMIT - 8 * 1024, (meta["name"], json_size(body))
        assert meta["namespace"] == "mail"
        assert meta["annotations"][ANN_REVISION] == t.revision
        assert meta["labels"][MANAGED_BY] == OPERATOR
        assert meta["labels"][LABEL_INSTANCE] == "relay"
        if number:
            assert meta["name"] == f"relay-mailtls-part-{number}"
            assert meta["labels"][LABEL_PART] == str(number)
            assert body["data"] == {}
            assert all(k.startswith(("tls_policy.gz.", "transport.gz.")) and k[-3:].isdigit()
                       for k in body["binaryData"])
    assert reassemble(bodies) == t.tls_policy
    assert reassemble(bodies, "transport") == t.transport
    assert reassemble(list(reversed(bodies))) == t.tls_policy  # order of bodies is free


# ------------------------------------------------------------------------------ shapes


def test_small_table_is_the_one_plain_configmap_it_always_was() -> None:
    policy = load_policy(obj({"destinations": ["example.com"], "level": "secure",
                              "match": ["nexthop"], "route": "direct"}), now=NOW)
    t = render([policy], instance=("mail", "relay"))
    bodies = configmap_bodies("mail", "relay", t)
    assert bodies == [{
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "relay-mailtls", "namespace": "mail",
                     "labels": {MANAGED_BY: OPERATOR, LABEL_INSTANCE: "relay"},
                     "annotations": {ANN_REVISION: t.revision}},
        "data": {"tls_policy": t.tls_policy, "transport": t.transport},
    }]
    assert configmap_body("mail", "relay", t) == bodies[0]
    check_set(bodies, t)


def test_medium_table_is_gzip_in_binary_data_of_the_one_configmap() -> None:
    t = tables(synthetic(25_000))  # 1.3 MiB raw
    assert len(t.tls_policy) > COMPRESS_ABOVE
    (body,) = configmap_bodies("mail", "relay", t)
    assert body["data"] == {}
    assert list(body["binaryData"]) == ["tls_policy.gz"]
    assert body["metadata"]["annotations"] == {ANN_REVISION: t.revision}
    assert gzip.decompress(base64.b64decode(body["binaryData"]["tls_policy.gz"])) == \
        t.tls_policy.encode()
    check_set([body], t)


def test_huge_table_is_split_into_parts_of_one_chunk_each() -> None:
    t = tables(synthetic(200_000))  # 10 MiB raw, 1.6 MiB gzip
    bodies = configmap_bodies("mail", "relay", t)
    packed = gzip.compress(t.tls_policy.encode(), compresslevel=9, mtime=0)
    chunks = -(-len(packed) // configmap.CHUNK)
    assert chunks == 3
    assert len(bodies) == 1 + chunks
    primary, *parts = bodies
    sha = hashlib.sha256(packed).hexdigest()
    assert primary["metadata"]["annotations"] == {
        ANN_REVISION: t.revision, ANN_PARTS: "3", ANN_SHA256["tls_policy"]: sha}
    assert "binaryData" not in primary
    assert primary["data"] == {"tls_policy.gz.chunks": (
        f"chunks: 3\nsize: {len(packed)}\nsha256: {sha}\n"
        "chunk: 000 relay-mailtls-part-1\nchunk: 001 relay-mailtls-part-2\n"
        "chunk: 002 relay-mailtls-part-3\n")}
    for index, part in enumerate(parts):
        assert list(part["binaryData"]) == [f"tls_policy.gz.{index:03d}"]
        assert base64.b64decode(part["binaryData"][f"tls_policy.gz.{index:03d}"]) == \
            packed[index * configmap.CHUNK:(index + 1) * configmap.CHUNK]
    check_set(bodies, t)


def test_large_transport_is_split_too_after_the_policy_chunks() -> None:
    t = tables(synthetic(150_000, seed=2),
               synthetic(150_000, seed=3, value="smtp:[relay.example]"))
    bodies = configmap_bodies("mail", "relay", t)
    keys = [k for b in bodies[1:] for k in b["binaryData"]]
    assert keys[0] == "tls_policy.gz.000" and keys[-1].startswith("transport.gz.")
    assert keys == sorted(keys, key=lambda k: (not k.startswith("tls"), k))
    primary = bodies[0]
    assert set(primary["data"]) == {"tls_policy.gz.chunks", "transport.gz.chunks"}
    assert set(primary["metadata"]["annotations"]) == {
        ANN_REVISION, ANN_PARTS, ANN_SHA256["tls_policy"], ANN_SHA256["transport"]}
    assert primary["metadata"]["annotations"][ANN_PARTS] == str(len(bodies) - 1)
    check_set(bodies, t)


def test_two_plain_tables_that_do_not_fit_together_are_split_not_refused() -> None:
    tls, transport = synthetic(17_000, seed=4), synthetic(17_000, seed=5, value="smtp:x")
    assert len(tls) <= COMPRESS_ABOVE and len(transport) <= COMPRESS_ABOVE
    t = tables(tls, transport)
    bodies = configmap_bodies("mail", "relay", t)
    assert len(bodies) == 2
    assert set(bodies[0]["data"]) == {"tls_policy", "transport.gz.chunks"}
    assert list(bodies[1]["binaryData"]) == ["transport.gz.000"]
    check_set(bodies, t)


def test_a_plain_table_whose_json_escaping_would_overflow_is_compressed() -> None:
    t = tables("a b\n" * (COMPRESS_ABOVE // 4 - 100))  # 25% newlines: \n is 2 bytes in JSON
    assert len(t.tls_policy) <= COMPRESS_ABOVE < json_size({"d": t.tls_policy})
    bodies = configmap_bodies("mail", "relay", t)
    assert "tls_policy" not in bodies[0]["data"]
    check_set(bodies, t)


def test_a_long_instance_name_with_a_plain_transport_and_many_chunks_fits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layout, "CHUNK", 32 * 1024)  # many chunks: a long manifest
    instance = "i" * 63
    t = tables(synthetic(200_000), synthetic(17_000, seed=8, value="smtp:x"))
    bodies = configmap_bodies("mail", instance, t)
    chunks = sum(len(b.get("binaryData", {})) for b in bodies)
    assert chunks > 50 and len(bodies) > 3
    assert bodies[0]["data"]["tls_policy.gz.chunks"].count(f"{instance}-mailtls-part-") == \
        chunks
    assert set(bodies[0]["data"]) == {"transport", "tls_policy.gz.chunks"}
    assert all(json_size(b) < LIMIT - 8 * 1024 for b in bodies)
    assert reassemble(bodies) == t.tls_policy
    assert reassemble(bodies, "transport") == t.transport


@pytest.mark.parametrize("kib", range(860, 1140, 20))
def test_every_size_around_the_limits_fits(kib: int) -> None:
    """Incompressible-ish text (gzip ~3:4) across the plain/gzip/split boundaries."""
    rng = random.Random(kib)
    line = 64
    text = "".join(base64.b64encode(rng.randbytes(45)).decode() + " may\n"
                   for _ in range(kib * 1024 // line))
    t = tables(text)
    check_set(configmap_bodies("mail", "relay", t), t)


# ------------------------------------------------------------------------ determinism

_PROGRAM = """
import hashlib, json, random, sys
from mailtls_operator.configmap import configmap_bodies
from mailtls_operator.render import Tables
rng = random.Random(1)
text = "".join(f"{rng.getrandbits(48):012x}.example may\\n" for _ in range(150_000))
t = Tables(revision="r", tls_policy=text, transport="", tls_entries={}, transport_entries={},
           owners={})
print(hashlib.sha256(json.dumps(configmap_bodies("mail", "relay", t)).encode()).hexdigest())
"""


def test_the_same_tables_give_byte_identical_bodies_in_any_process() -> None:
    def run(seed: str) -> str:
        out = subprocess.run([sys.executable, "-c", _PROGRAM], capture_output=True, text=True,
                             timeout=60, check=True, env={"PYTHONHASHSEED": seed})
        return out.stdout.strip()

    first = run("1")
    assert run("2") == first
    rng = random.Random(1)
    text = "".join(f"{rng.getrandbits(48):012x}.example may\n" for _ in range(150_000))
    t = Tables(revision="r", tls_policy=text, transport="", tls_entries={},
               transport_entries={}, owners={})
    bodies = configmap_bodies("mail", "relay", t)
    assert len(bodies) > 2
    assert hashlib.sha256(json.dumps(bodies).encode()).hexdigest() == first


def test_bodies_are_fresh_objects_each_call() -> None:
    t = tables(synthetic(200_000))
    first = configmap_bodies("mail", "relay", t)
    first[1]["binaryData"]["tls_policy.gz.000"] = "spoiled"
    first[0]["metadata"]["annotations"].clear()
    again = configmap_bodies("mail", "relay", t)
    assert again[1]["binaryData"]["tls_policy.gz.000"] != "spoiled"
    check_set(again, t)


# ------------------------------------------------------------------ stale, same, patch


def names(bodies: list[Body]) -> list[str]:
    return [b["metadata"]["name"] for b in bodies]


def test_stale_parts_after_shrinking() -> None:
    big = configmap_bodies("mail", "relay", tables(synthetic(200_000)))
    smaller = configmap_bodies("mail", "relay", tables(synthetic(100_000)))
    medium = configmap_bodies("mail", "relay", tables(synthetic(25_000)))
    assert len(big) == 4 and len(smaller) == 3 and len(medium) == 1
    existing = [*names(big), "relay-mailtls-part-01", "relay-mailtls-part-x",
                "other-mailtls-part-1", "relay-postfix", "relay-mailtls-part-9"]
    assert stale_parts(existing, smaller) == ["relay-mailtls-part-3", "relay-mailtls-part-9"]
    assert stale_parts(reversed(existing), medium) == [
        "relay-mailtls-part-1", "relay-mailtls-part-2", "relay-mailtls-part-3",
        "relay-mailtls-part-9"]
    assert stale_parts(names(big), big) == []
    assert stale_parts(names(medium), big) == []  # growing: nothing to delete
    with pytest.raises(ValueError):
        stale_parts(existing, [])


def test_part_names_are_unambiguous() -> None:
    assert part_name("relay", 12) == "relay-mailtls-part-12"
    assert part_number("relay-mailtls-part-12", "relay") == 12
    assert part_number("relay-mailtls", "relay") is None
    assert part_number("relay-mailtls-part-1", "relay-mailtls-part-1") is None
    assert part_number("a-mailtls-part-1-mailtls-part-2", "a") is None
    assert part_number("a-mailtls-part-1-mailtls-part-2", "a-mailtls-part-1") == 2
    assert part_number("relay-mailtls-part-0", "relay") is None
    assert part_number("relay-mailtls-part-\u0661", "relay") is None  # a non-ASCII digit


def test_same_content_compares_each_body_and_our_annotations() -> None:
    split = configmap_bodies("mail", "relay", tables(synthetic(200_000)))
    for body in split:
        stored = json.loads(json.dumps(body))
        stored["metadata"].update(uid="u", resourceVersion="7")
        stored["metadata"]["labels"]["someone/else"] = "x"
        assert same_content(stored, body)
    edited = json.loads(json.dumps(split[2]))
    edited["binaryData"]["tls_policy.gz.001"] = base64.b64encode(b"x").decode()
    assert not same_content(edited, split[2])
    assert not same_content(None, split[0])

    # The tables shrank: the stored primary still says it is split. Not the same, and
    # the patch removes the annotations along with the keys.
    single = configmap_bodies("mail", "relay", tables(synthetic(25_000)))[0]
    stored = json.loads(json.dumps(split[0]))
    stored["metadata"]["annotations"][ANN_REVISION] = single["metadata"]["annotations"][
        ANN_REVISION]
    assert not same_content(stored, single)
    patch = merge_patch(stored, single)
    assert patch["metadata"]["annotations"] == {
        ANN_REVISION: single["metadata"]["annotations"][ANN_REVISION],
        ANN_PARTS: None, ANN_SHA256["tls_policy"]: None}
    assert patch["data"] == {"tls_policy.gz.chunks": None}
    assert patch["binaryData"] == single["binaryData"]
    assert same_content(apply_merge_patch(stored, patch), single)


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies it."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = apply_merge_patch(out.get(k), v)
    return out


# ------------------------------------------------------------------------ reassemble


def test_reassemble_refuses_a_half_updated_set() -> None:
    old = configmap_bodies("mail", "relay", tables(synthetic(200_000, seed=6)))
    new = configmap_bodies("mail", "relay", tables(synthetic(200_000, seed=7)))
    with pytest.raises(Unreadable, match="half-updated"):
        reassemble([new[0], *old[1:]])
    # Same revision label but a chunk of another table: the sha256 catches it.
    forged = json.loads(json.dumps(old[2]))
    forged["binaryData"] = new[2]["binaryData"]
    with pytest.raises(Unreadable, match="sha256"):
        reassemble([old[0], old[1], forged, old[3]])
    with pytest.raises(Unreadable, match="missing"):
        reassemble(old[:-1])
    with pytest.raises(Unreadable, match="more than one"):
        reassemble([*old, old[1]])


def test_beyond_max_parts_is_refused_with_a_clear_message(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layout, "MAX_PARTS", 2)
    with pytest.raises(TableTooLarge, match=r"mail/relay: .* would need 3 part ConfigMaps"
                                            r".* at most 2 are written"):
        configmap_bodies("mail", "relay", tables(synthetic(200_000)))
    monkeypatch.setattr(layout, "MAX_PARTS", 3)
    check_set(configmap_bodies("mail", "relay", tables(synthetic(200_000))),
              tables(synthetic(200_000)))
