"""MailTLSDiscovery objects: validated with their CRD, turned into discovered entries.

Pure.  The CRD file in ``crds/`` is the single source of validation truth for
the kind, as for MailTLSPolicy: its schema is loaded here (through the same
OpenAPI -> JSON Schema conversion as :mod:`mailtls_operator.crd`), then the
model adds what a schema cannot say (IDNA, next-hop forms, duplicates).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ..crd import KIND as POLICY_KIND
from ..crd import prune_nulls, root_errors
from ..crd.meta import created_of, meta_errors, metadata_of, name_of, namespace_of
from ..crd.schema import _path, _schema_message, structural_validator
from ..crd.validate import json_errors
from ..policy import Policy, PolicyInvalid, load_policy
from ..safetext import one_line
from ..sources import SourceError, read_objects
from .decide import SOURCES, DomainState
from .entries import DomainInvalid, domain_keys, entries

KIND = "MailTLSDiscovery"
PLURAL = "mailtlsdiscoveries"
CRD_FILENAME = "mailtlsdiscoveries.mailtls.io.yaml"


class DiscoveryInvalid(ValueError):
    """A discovery object (or a file) that is refused; the message names it."""


def crd_path() -> Path:
    packaged = resources.files("mailtls_operator").joinpath("discovery/crd.yaml")
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[3] / "crds" / CRD_FILENAME


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    with crd_path().open(encoding="utf-8") as fh:
        crd = yaml.safe_load(fh)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return structural_validator(schema, strict_objects=True)  # RE2, as the API server


@dataclass(frozen=True)
class Discovery:
    """A valid MailTLSDiscovery."""

    namespace: str
    name: str
    domains: tuple[str, ...]
    sources: tuple[str, ...]
    instances: tuple[str, ...] = ()
    created: datetime = datetime(1970, 1, 1, tzinfo=UTC)
    check_interval: int = 3600

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def covers(self, key: str) -> bool:
        return any(key in domain_keys(d) for d in self.domains)

    def domains_for(self, key: str) -> list[str]:
        return [d for d in self.domains if key in domain_keys(d)]

    def entries(self, states: Iterable[DomainState]) -> list[Policy]:
        return entries(states, namespace=self.namespace, name=self.name,
                       created=self.created, instances=self.instances)


def load_discovery(obj: Mapping[str, Any]) -> Discovery:
    """A MailTLSDiscovery object -> :class:`Discovery`, or :class:`DiscoveryInvalid`."""
    obj = prune_nulls(obj)  # as the API server does before it validates
    meta = metadata_of(obj)
    ref = one_line(f"{namespace_of(meta)}/{name_of(meta)}")
    spec = obj.get("spec")
    errors = [str(e) for e in meta_errors(obj) + root_errors(obj)]
    not_json = [str(e) for e in json_errors(spec, "spec")]  # before the schema repr()s it
    errors += not_json or ([f"{_path('spec', e.absolute_path)}: {_schema_message(e)}"
                            for e in _validator().iter_errors(spec)]
                           if spec is not None else ["spec: Required"])
    if not errors:
        assert isinstance(spec, Mapping)
        seen: dict[str, int] = {}
        for i, domain in enumerate(spec["domains"]):
            try:
                keys = domain_keys(domain)
            except DomainInvalid as exc:
                errors.append(f"spec.domains[{i}]: Invalid value: {exc}")
                continue
            if keys[0] in seen:
                errors.append(f"spec.domains[{i}]: Duplicate value: same key as "
                              f"spec.domains[{seen[keys[0]]}] ({keys[0]})")
            seen.setdefault(keys[0], i)
    if errors:
        raise DiscoveryInvalid(f"{ref}: " + "; ".join(sorted(errors)))
    assert isinstance(spec, Mapping)
    sources = set(spec.get("sources") or SOURCES)
    return Discovery(namespace=namespace_of(meta), name=name_of(meta),
                     domains=tuple(spec["domains"]),
                     sources=tuple(s for s in SOURCES if s in sources),
                     instances=tuple(spec.get("instances", ())),
                     created=created_of(meta),
                     check_interval=int(spec.get("checkIntervalSeconds", 3600)))


def load_explain_inputs(paths: list[str], now: datetime
                        ) -> tuple[list[Policy], list[Discovery]]:
    """Every MailTLSPolicy and MailTLSDiscovery in ``paths``, validated like the cluster does
    (read by the one loader, :func:`mailtls_operator.sources.read_objects`)."""
    policies: list[Policy] = []
    discoveries: list[Discovery] = []
    try:
        for item in read_objects(paths):
            if item.kind == POLICY_KIND:
                policies.append(load_policy(item.obj, now=now))
            elif item.kind == KIND:
                discoveries.append(load_discovery(item.obj))
    except (SourceError, DiscoveryInvalid) as exc:
        raise DiscoveryInvalid(str(exc)) from exc
    except PolicyInvalid as exc:
        raise DiscoveryInvalid(str(exc)) from exc
    return policies, discoveries
