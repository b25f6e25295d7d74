"""The world index keeps annotations the operator wrote until their watch echo arrives.

A pod event sent before our ``applied-revision`` patch can be delivered after it; taken
as it is, it would make the pod look behind again and start a second rollout of a
revision every pod already has (seen as a doubled rollout in CI)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from mailtls_operator.world import ANN_APPLIED, INSTANCE_LABEL, World


def pod(uid: str = "u1", **annotations: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "mail", "name": "relay-0", "uid": uid,
                         "labels": {INSTANCE_LABEL: "relay"}, "annotations": annotations},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


def world() -> World:
    w = World(clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    w.upsert_pod(pod())
    return w


def applied(w: World) -> str | None:
    return w.pods[("mail", "relay-0")].annotations.get(ANN_APPLIED)


def test_a_stale_event_after_our_write_does_not_put_the_pod_back() -> None:
    w = world()
    w.wrote_pod_annotations("mail", "relay-0", {ANN_APPLIED: "rev2"})
    assert w.upsert_pod(pod()) == set()  # sent before the patch, delivered after it
    assert applied(w) == "rev2"


def test_the_echo_of_our_write_hands_the_pod_back_to_events() -> None:
    w = world()
    w.wrote_pod_annotations("mail", "relay-0", {ANN_APPLIED: "rev2"})
    w.upsert_pod(pod(**{ANN_APPLIED: "rev2"}))
    w.upsert_pod(pod(**{ANN_APPLIED: "edited"}))  # a later change by someone else counts
    assert applied(w) == "edited"


def test_a_replaced_pod_forgets_what_was_written_to_the_old_one() -> None:
    w = world()
    w.wrote_pod_annotations("mail", "relay-0", {ANN_APPLIED: "rev2"})
    w.upsert_pod(pod(uid="u2"))
    assert applied(w) is None


def test_a_deleted_pod_forgets_what_was_written() -> None:
    w = world()
    w.wrote_pod_annotations("mail", "relay-0", {ANN_APPLIED: "rev2"})
    w.delete_pod("mail", "relay-0")
    w.upsert_pod(pod())
    assert applied(w) is None
