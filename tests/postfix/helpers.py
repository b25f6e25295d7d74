"""Helpers for the real-Postfix tests: policies through the real model and renderer."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from mailtls_operator.podrunner import PodRef
from mailtls_operator.policy import Policy, load_policy
from mailtls_operator.render import REVISION_KEY, render, revision_value
from mailtls_operator.rollout import PodTarget, TableSet
from testbed import LocalInstance

INSTANCE = ("mail", "relay")
_created = itertools.count()


def policy(name: str, level: str, destinations: list[str], **spec: Any) -> Policy:
    """A MailTLSPolicy through the real validation (CRD schema, CEL twins, model)."""
    n = next(_created)
    obj = {"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy",
           "metadata": {"name": name, "namespace": INSTANCE[0], "uid": f"uid-{name}",
                        "generation": 1,
                        "creationTimestamp": f"2026-01-01T00:{n // 60 % 60:02d}:{n % 60:02d}Z"},
           "spec": {"destinations": destinations, "level": level, **spec}}
    return load_policy(obj)


def tables(*policies: Policy) -> TableSet:
    """Render ``policies`` for the test instance, as the controller would."""
    return TableSet.of(render(policies, instance=INSTANCE))


def raw_tables(revision: str, entries: Mapping[str, str],
               transport: Mapping[str, str] | None = None) -> TableSet:
    """Tables written by hand (for what the renderer would refuse to produce)."""
    tls = {REVISION_KEY: revision_value(revision), **entries}
    text = "".join(f"{k} {v}\n" for k, v in tls.items())
    ttext = "".join(f"{k} {v}\n" for k, v in (transport or {}).items())
    return TableSet(revision, text, ttext or None, tls, dict(transport or {}))


def target(pod: PodRef, inst: LocalInstance, applied_revision: str | None = None,
           **kw: Any) -> PodTarget:
    """The rollout target for a local instance (its map paths are inside its directory)."""
    return PodTarget(pod, map_path=str(inst.map_path), map_type=inst.settings.map_type,
                     applied_revision=applied_revision,
                     configmap_dir=str(inst.configmap_dir), **kw)


def live_revision(inst: LocalInstance) -> str | None:
    """The revision value the live TLS policy table answers for the revision key."""
    return inst.query(REVISION_KEY)
