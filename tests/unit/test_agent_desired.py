"""The agent's loading of a revision (pure): whole and consistent, or refused with a reason."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailtls_operator.agent import desired
from mailtls_operator.configmap import configmap_bodies
from mailtls_operator.policy import Policy, load_policy
from mailtls_operator.render import REVISION_KEY, Tables, render
from tests.postfix.agent_helpers import small_configmap_limits

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def pol(name: str, **spec: Any) -> Policy:
    return load_policy({"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy",
                        "metadata": {"name": name, "namespace": "mail",
                                     "creationTimestamp": "2026-01-01T00:00:00Z"},
                        "spec": spec}, now=NOW)


def tables(n: int = 3, level: str = "encrypt") -> Tables:
    policies = [pol(f"p{i}", destinations=[f"d{i}.example"], level=level,
                    **({"route": "direct"} if i == 0 else {})) for i in range(n)]
    return render(policies, instance=("mail", "relay"), now=NOW)


@pytest.fixture
def small_limits(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with small_configmap_limits(monkeypatch):
        yield


def test_a_rendered_configmap_loads_as_rendered() -> None:
    t = tables()
    got = desired.from_configmaps(configmap_bodies("mail", "relay", t))
    assert got.revision == t.revision
    assert dict(got.tls_entries) == dict(t.tls_entries)
    assert dict(got.transport_entries) == dict(t.transport_entries) != {}
    assert got.tls_entries[REVISION_KEY] == t.revision_value()


@pytest.mark.parametrize("table,edit", [("tls_policy", ("encrypt", "may")),
                                        ("tls_policy", ("d1.example encrypt\n", "")),
                                        ("transport", ("smtp:", "relay:"))])
def test_an_edited_or_truncated_table_is_refused(table: str, edit: tuple[str, str]) -> None:
    body = configmap_bodies("mail", "relay", tables())[0]
    body["data"][table] = body["data"][table].replace(*edit, 1)
    with pytest.raises(desired.Malformed, match="sha256"):
        desired.from_configmaps([body])


def test_a_revision_annotation_that_disagrees_is_refused() -> None:
    body = configmap_bodies("mail", "relay", tables())[0]
    body["metadata"]["annotations"]["mailtls.io/revision"] = "0" * 64
    with pytest.raises(desired.Malformed, match="says revision"):
        desired.from_configmaps([body])


def test_no_table_is_refused_not_taken_as_empty() -> None:
    with pytest.raises(desired.Malformed, match="no tls_policy"):
        desired.from_configmaps([{"metadata": {"name": "relay-mailtls"}, "data": {}}])


@pytest.mark.usefixtures("small_limits")
def test_split_parts_load_and_a_missing_or_foreign_part_is_refused() -> None:
    big = tables(300)
    bodies = configmap_bodies("mail", "relay", big)
    assert len(bodies) > 2, "the table must be split for this test"
    assert desired.from_configmaps(bodies).revision == big.revision
    with pytest.raises(desired.Malformed, match="missing"):
        desired.from_configmaps(bodies[:-1])
    other = configmap_bodies("mail", "relay", tables(300, "may"))
    mixed = [bodies[0], other[1], *bodies[2:]]
    with pytest.raises(desired.Malformed):
        desired.from_configmaps(mixed)


def _mount(directory: Path, body: dict[str, Any]) -> None:
    """What the kubelet writes for a ConfigMap volume: one file per key, plus its links."""
    directory.mkdir()
    for key, text in (body.get("data") or {}).items():
        (directory / key).write_text(text, encoding="utf-8")
    for key, b64 in (body.get("binaryData") or {}).items():
        (directory / key).write_bytes(base64.b64decode(b64))
    (directory / "..data").mkdir()


@pytest.mark.usefixtures("small_limits")
def test_the_mounted_volume_loads_like_the_api_split_or_not(tmp_path: Path) -> None:
    for n, case in ((3, "plain"), (300, "split")):
        bodies = configmap_bodies("mail", "relay", tables(n))
        _mount(tmp_path / case, bodies[0])
        parts = None
        if len(bodies) > 1:
            parts = tmp_path / f"{case}-parts"
            _mount(parts, {"data": {}, "binaryData": {
                k: v for b in bodies[1:] for k, v in (b.get("binaryData") or {}).items()}})
        assert desired.from_directory(tmp_path / case, parts).revision == \
            desired.from_configmaps(bodies).revision
    with pytest.raises(desired.Malformed, match="not mounted"):
        desired.from_directory(tmp_path / "absent")


def test_changed_keys_are_the_lines_that_differ() -> None:
    old, new = tables(3, "encrypt").tls_entries, tables(2, "may").tls_entries
    assert desired.changed_keys(old, new) == {"d0.example", "d1.example", "d2.example"}
    assert desired.changed_keys(old, old) == set()


def test_agent_data_lists_audit_policies_and_every_tafile_enforced_ones_come_from_the_table(
        ) -> None:
    audit = pol("audit", destinations=["a.example"], level="secure", match=["nexthop"],
                tafile=["/etc/ca.pem"], mode="audit")
    enforced = pol("enf", destinations=["b.example", "bücher.example"], level="verify",
                   match=["nexthop"], tafile=["/etc/other.pem"])
    t = render([audit, enforced], instance=("mail", "relay"), now=NOW)
    for probe_enforced in (True, False):
        raw = desired.agent_data([enforced, audit], lambda p: p.mode == "audit",
                                 probe_enforced=probe_enforced)
        assert "b.example" not in raw  # enforced destinations are not written twice
        got = desired.load(t.tls_policy, t.transport, raw)
        assert got.tafiles == ("/etc/ca.pem", "/etc/other.pem")
        wanted = [desired.ProbeSpec("mail/audit", audit.value, ("a.example",))]
        if probe_enforced:
            wanted.append(desired.ProbeSpec("mail/enf", enforced.value, tuple(sorted(
                enforced.keys))))
        assert list(got.probes) == wanted
    assert got.probes[0].level == "secure"
    with pytest.raises(desired.Malformed, match=r"agent\.json"):
        desired.load(t.tls_policy, t.transport, '{"probes": [{"ref": 1}]}')


def test_table_policies_reads_each_owner_and_its_keys() -> None:
    t = tables(3)
    specs = desired.table_policies(t.tls_policy)
    assert [(s.ref, s.keys, s.value) for s in specs] == [
        (f"mail/p{i}", (f"d{i}.example",), "encrypt") for i in range(3)]
