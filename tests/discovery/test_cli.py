"""``mailtls discover`` and ``mailtls explain``: streams, exit codes, port 443 via --nameserver."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mailtls_operator.cli import main
from testbed.stsworld import StsWorld

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="HTTPS on port 443 needs root")

ADDRESS = "127.0.84.43"  # a loopback address of its own: port 443 is free there


@pytest.fixture
def world443() -> Iterator[StsWorld]:
    names = ["mta-sts.partner.example", "mta-sts.testing.example", "mta-sts.dane.example"]
    with StsWorld(names, address=ADDRESS, https_port=443) as w:
        w.publish_sts("partner.example", id="7", mx=["*.partner.example"])
        w.publish_sts("testing.example", id="1", mode="testing")
        w.publish_sts("dane.example", id="1")
        w.publish_mx("dane.example", "mx.dane.example", tlsa=True, signed=True)
        yield w


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_discover_prints_the_lines_and_explains_on_stderr(
        world443: StsWorld, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "discover", "partner.example", "testing.example",
                          "dane.example", "nothing.example", "--nameserver",
                          world443.nameserver, "--ca-file", world443.ca_file)
    assert code == 0, err
    assert out == ("dane.example dane-only\n"
                   "partner.example secure match=.partner.example servername=hostname\n")
    assert "testing.example: mta-sts: id 1, mode testing" in err
    assert "would enforce 'secure match=mx.testing.example servername=hostname'" in err
    assert "dane.example: dane wins over mta-sts" in err
    assert "nothing.example: no line" in err


def test_discover_exit_1_when_a_lookup_fails(world443: StsWorld,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    world443.publish_sts("wrongcert.example", id="1")
    code, out, err = _run(capsys, "discover", "partner.example", "wrongcert.example",
                          "--source", "mta-sts", "--nameserver", world443.nameserver,
                          "--ca-file", world443.ca_file)
    assert code == 1
    assert out == "partner.example secure match=.partner.example servername=hostname\n"
    assert "wrongcert.example: mta-sts: error: policy fetch failed" in err
    assert "certificate" in err


def test_discover_probe_reports_testing_domains(world443: StsWorld,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from testbed import postfix_unavailable

    if (reason := postfix_unavailable()) is not None:
        pytest.skip(reason)
    world443.publish_mx("testing.example", "mx.elsewhere.example")  # not an allowed MX
    code, out, err = _run(capsys, "discover", "testing.example", "--source", "mta-sts",
                          "--probe", "--nameserver", world443.nameserver,
                          "--ca-file", world443.ca_file)
    assert (code, out) == (0, "")  # a report, never a line
    assert ("testing.example: mta-sts testing: would fail if enforced (no MX host "
            "(mx.elsewhere.example) matches the policy's mx patterns)") in err


@pytest.mark.parametrize("argv", [
    ["discover", "[mx.example]"],
    ["discover", "example.com", "--nameserver", "127.0.0.1:99999"],
    ["discover", "example.com", "--ca-file", "/nonexistent/ca.pem"],
    ["discover"],
    ["discover", "example.com", "--probe", "--config-dir", "/nonexistent"],
])
def test_discover_exit_2_on_bad_arguments(argv: list[str],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, *argv)
    assert (code, out) == (2, "") and err


def test_explain_names_object_source_and_loser(world443: StsWorld, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    docs = [
        {"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSDiscovery",
         "metadata": {"name": "partners", "namespace": "mail"},
         "spec": {"domains": ["partner.example", "dane.example"]}},
        {"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy",
         "metadata": {"name": "dane-override", "namespace": "mail"},
         "spec": {"destinations": ["dane.example"], "level": "encrypt"}},
    ]
    (tmp_path / "objs.yaml").write_text(yaml.safe_dump_all(docs))
    lookup = ["--nameserver", world443.nameserver, "--ca-file", world443.ca_file]
    code, out, _ = _run(capsys, "explain", "partner.example", "-f", str(tmp_path), *lookup)
    assert code == 0
    assert out.splitlines()[:2] == [
        "partner.example secure match=.partner.example servername=hostname",
        "  from mail/partners[mta-sts] (source mta-sts)"]
    code, out, _ = _run(capsys, "explain", "DANE.example", "-f", str(tmp_path), *lookup)
    assert code == 0
    lines = out.splitlines()
    assert lines[:2] == ["dane.example encrypt", "  from mail/dane-override (source static)"]
    assert any("beat mail/partners[dane] (dane: dane-only): an explicit policy" in x
               for x in lines)
    assert any("beat mail/partners[mta-sts]" in x for x in lines)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSDiscovery",
         "metadata": {"name": "bad"}, "spec": {"domains": ["x.example"], "sources": ["dns"]}}))
    code, out, err = _run(capsys, "explain", "x.example", "-f", str(tmp_path))
    assert (code, out) == (2, "") and "default/bad: spec.sources[0]: Unsupported value" in err
