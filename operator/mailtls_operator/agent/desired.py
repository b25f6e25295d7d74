"""What the agent must make true in its pod, read from the instance's ConfigMaps (pure).

Everything the ``exec`` strategy did to a pod from outside is desired state in
the ConfigMaps the operator already writes (DESIGN.md §11):

- the tables (``tls_policy``, ``transport``; plain, gzip or split into parts,
  see :mod:`..configmap`), whose integrity the agent proves itself: the split
  parts by the manifest's sha256 (:func:`..configmap.reassemble`), the whole
  set by recomputing the revision the renderer wrote in the table's header
  (sha256 of the TLS body, a NUL, the transport text) -- a truncated, mixed or
  hand-edited set is refused and the last good table stays live;
- which policies to probe: ``data["agent.json"]`` of the primary ConfigMap
  (written only for instances in agent mode) lists the audit-mode ones (their
  lines are not in the table), ``{"probes": [{"ref", "value", "keys"}],
  "tafiles": [...], "probeEnforced": bool}``; the enforced ones are read from
  the table's ``# ns/name`` owner comments (:func:`table_policies`);
- which keys changed: not written anywhere, the agent diffs the table it
  replaces with the new one (:func:`changed_keys`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .. import strictjson
from ..configmap import ANN_REVISION, Unreadable, reassemble
from ..render import REVISION_KEY, revision_value

AGENT_DATA = "agent.json"
"""The key of the primary ConfigMap that holds the agent's desired state besides tables."""
AGENT_DATA_MAX = 1024 * 1024
"""Bytes: agent.json is in a ConfigMap, which the API server caps at 1 MiB."""
_REVISION_HEADER = "# revision: "


class Malformed(ValueError):
    """The ConfigMap set cannot be loaded; the message says why (for the report)."""


@dataclass(frozen=True)
class ProbeSpec:
    """One policy to probe from the pod: its ref, table value and destination keys."""

    ref: str
    value: str
    keys: tuple[str, ...]

    @property
    def level(self) -> str:
        return self.value.split(" ", 1)[0]


@dataclass(frozen=True)
class Desired:
    """One revision of an instance, as the operator wrote it."""

    revision: str
    tls_policy: str
    transport: str
    tls_entries: Mapping[str, str]
    transport_entries: Mapping[str, str]
    probes: tuple[ProbeSpec, ...] = field(default=())
    tafiles: tuple[str, ...] = field(default=())
    """Trust-anchor files the instance's policies name: the agent reports unreadable ones
    (the operator then holds those policies back, as the exec strategy's check does)."""


def entries(text: str) -> dict[str, str]:
    """``KEY -> VALUE`` of a table text as Postfix reads it (comments and blanks skipped)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        out.setdefault(key, value)
    return out


def table_revision(tls_policy: str, transport: str) -> str:
    """The revision the renderer computes (``render.render``), recomputed from the texts."""
    marker = f"{REVISION_KEY} "
    start = tls_policy.find("\n" + marker)
    if start < 0:
        raise Malformed(f"tls_policy has no {REVISION_KEY} line")
    body = tls_policy[tls_policy.index("\n", start + 1) + 1:]
    trans_body = _after_header(transport) if transport else ""
    digest = hashlib.sha256(body.encode("utf-8"))
    digest.update(("\0" + trans_body).encode("utf-8"))
    return digest.hexdigest()


def _after_header(text: str) -> str:
    """The transport text without the renderer's three header comment lines."""
    lines = text.split("\n", 3)
    if len(lines) < 4 or not lines[2].startswith(_REVISION_HEADER):
        raise Malformed("transport has no revision header")
    return lines[3]


def _header_revision(text: str) -> str:
    for line in text.split("\n", 4)[:4]:
        if line.startswith(_REVISION_HEADER):
            return line[len(_REVISION_HEADER):].strip()
    raise Malformed("tls_policy has no revision header")


_OWNER = re.compile(r"# ([a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?)")


def table_policies(tls_policy: str) -> list[ProbeSpec]:
    """The enforced policies in a rendered table: each ``# ns/name`` comment line and the
    ``KEY VALUE`` lines that follow it (the renderer groups a policy's lines so)."""
    found: dict[str, tuple[str, list[str]]] = {}
    owner: str | None = None
    for line in tls_policy.splitlines():
        if line.startswith("#"):
            m = _OWNER.fullmatch(line)
            owner = m.group(1) if m else None
            continue
        key, _, value = line.partition(" ")
        if owner is None or not value or key == REVISION_KEY:
            continue
        found.setdefault(owner, (value, []))[1].append(key)
    return [ProbeSpec(ref, value, tuple(keys)) for ref, (value, keys) in found.items()]


def _agent_data(raw: str | None, tls_policy: str
                ) -> tuple[tuple[ProbeSpec, ...], tuple[str, ...]]:
    if not raw:
        return (), ()
    try:
        doc = strictjson.loads(raw, max_bytes=AGENT_DATA_MAX)
        listed = [ProbeSpec(str(p["ref"]), str(p["value"]), tuple(str(k) for k in p["keys"]))
                  for p in doc.get("probes", [])]
        tafiles = tuple(str(f) for f in doc.get("tafiles", []))
        enforced = bool(doc.get("probeEnforced", False))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Malformed(f"{AGENT_DATA}: {type(exc).__name__}: {exc}"[:300]) from exc
    if enforced:
        seen = {p.ref for p in listed}
        listed += [p for p in table_policies(tls_policy) if p.ref not in seen]
    return tuple(sorted(listed, key=lambda p: p.ref)), tafiles


def load(tls_policy: str, transport: str, agent_data: str | None = None,
         revision: str | None = None) -> Desired:
    """Check and load one revision; raise :class:`Malformed` unless it is whole and consistent.

    ``revision`` is the ConfigMap's ``mailtls.io/revision`` annotation, when known.
    """
    if not tls_policy:
        raise Malformed("the ConfigMap holds no tls_policy table")
    stated = _header_revision(tls_policy)
    actual = table_revision(tls_policy, transport)
    if actual != stated:
        raise Malformed(f"the tables' sha256 is {actual[:16]}, their header says "
                        f"{stated[:16]}: truncated or edited")
    if revision and revision != actual:
        raise Malformed(f"the ConfigMap says revision {revision[:16]}, its tables are "
                        f"{actual[:16]}")
    tls = entries(tls_policy)
    if tls.get(REVISION_KEY) != revision_value(actual):
        raise Malformed(f"{REVISION_KEY} does not answer revision {actual[:16]}")
    probes, tafiles = _agent_data(agent_data, tls_policy)
    return Desired(actual, tls_policy, transport, tls, entries(transport), probes, tafiles)


def from_configmaps(bodies: Sequence[Mapping[str, Any]]) -> Desired:
    """The primary ConfigMap (first) and its parts, as read from the API."""
    if not bodies:
        raise Malformed("no ConfigMap")
    try:
        tls = reassemble(bodies, "tls_policy")
        transport = reassemble(bodies, "transport")
    except Unreadable as exc:
        raise Malformed(str(exc)) from exc
    primary = bodies[0]  # reassemble refused it unless metadata, annotations, data are maps
    annotations = (primary.get("metadata") or {}).get("annotations") or {}
    return load(tls, transport, (primary.get("data") or {}).get(AGENT_DATA),
                annotations.get(ANN_REVISION))


def from_directory(path: Path, parts: Path | None = None) -> Desired:
    """The ConfigMap as the kubelet mounts it (one file per key; parts in ``parts``)."""
    bodies = [_directory_body(path)]
    if parts is not None and parts.is_dir():
        bodies.append(_directory_body(parts))
    return from_configmaps(bodies)


def _directory_body(path: Path) -> dict[str, Any]:
    data: dict[str, str] = {}
    binary: dict[str, str] = {}
    if not path.is_dir():
        raise Malformed(f"{path} is not mounted")
    for item in sorted(path.iterdir()):
        if item.name.startswith(".") or not item.is_file():
            continue  # the kubelet's ..data symlinks and timestamped directories
        raw = item.read_bytes()
        if item.name.endswith(".gz") or re.search(r"\.gz\.[0-9]{3}$", item.name):
            binary[item.name] = base64.b64encode(raw).decode("ascii")
        else:
            data[item.name] = raw.decode("utf-8")
    return {"metadata": {"name": str(path)}, "data": data, "binaryData": binary}


def changed_keys(old: Mapping[str, str], new: Mapping[str, str]) -> set[str]:
    """Keys whose line differs (added, removed or changed): their deferred mail is released."""
    return {k for k in old.keys() | new.keys()
            if old.get(k) != new.get(k) and k != REVISION_KEY}


class ProbeablePolicy(Protocol):
    @property
    def ref(self) -> str: ...
    @property
    def value(self) -> str: ...
    @property
    def keys(self) -> tuple[str, ...]: ...
    @property
    def tafile(self) -> tuple[str, ...]: ...


P = TypeVar("P", bound=ProbeablePolicy)


def agent_data(policies: Iterable[P], audit: Callable[[P], bool], *,
               probe_enforced: bool) -> str:
    """``data["agent.json"]`` for an instance in agent mode (the operator writes it).

    It lists only what the tables cannot say -- the ``audit`` policies to probe (their
    lines are not in the table) and every trust-anchor file any policy of the instance
    names -- plus ``probeEnforced``: the agent then probes the enforced policies it reads
    from the table itself (:func:`table_policies`), so a bulk load of enforced policies
    does not write its destinations twice into the 1 MiB ConfigMap.
    """
    ordered = sorted(policies, key=lambda p: p.ref)
    probes = [{"ref": p.ref, "value": p.value, "keys": list(p.keys)}
              for p in ordered if audit(p)]
    tafiles = sorted({f for p in ordered for f in p.tafile})
    return json.dumps({"probes": probes, "tafiles": tafiles,
                       "probeEnforced": probe_enforced}, sort_keys=True,
                      separators=(",", ":"))
