"""Command-line numbers and addresses (issue 22, item 9's CLI part): every value outside
an option's range is an argparse error (exit 2, one line), never a traceback, a hang or
a query sent somewhere else."""

from __future__ import annotations

import argparse
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailtls_operator.cli import build_parser, main
from mailtls_operator.cli.argtypes import bounded_float, bounded_int
from mailtls_operator.cli.discover import check_ca_file
from mailtls_operator.discovery.dns import parse_nameserver

FLOAT_OPTIONS = [
    ["validate", "-f", "x.yaml", "--max-exception-days"],
    ["render", "-f", "x.yaml", "--max-exception-days"],
    ["probe", "-f", "x.yaml", "--timeout"],
    ["discover", "a.example", "--timeout"],
    ["explain", "a.example", "-f", "x.yaml", "--timeout"],
    ["run", "--debounce"], ["run", "--max-delay"], ["run", "--max-exception-days"],
    ["run", "--probe-interval"], ["run", "--status-qps"],
]


@pytest.mark.parametrize("option", FLOAT_OPTIONS, ids=lambda o: f"{o[0]} {o[-1]}")
@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e308", "1e999", "-1",
                                   "", "\u0661", "\uff11", "0x10", "1_0", " 1"])
def test_a_float_option_refuses_what_is_no_number_in_range(
        option: list[str], value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("mailtls ") and f"argument {option[-1]}" in err[-1]


@pytest.mark.parametrize(("option", "value"), [
    (["discover", "a.example", "--timeout"], "0"),
    (["probe", "-f", "x", "--timeout"], "0"),
    (["probe", "-f", "x", "--concurrency"], "0"),
    (["probe", "-f", "x", "--concurrency"], "\u0663"),
    (["probe", "-f", "x", "--concurrency"], "9" * 5000),
    (["run", "--parallelism"], "0"),
    (["run", "--health"], "0.0.0.0:\u00b2"), (["run", "--health"], "0.0.0.0"),
    (["run", "--metrics"], "0.0.0.0:70000"), (["run", "--metrics"], "a b:80"),
    (["run", "--health"], "off"),
])
def test_zero_and_foreign_digits_are_refused_where_they_mean_nothing(
        option: list[str], value: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*option, value])
    assert exit_.value.code == 2


@pytest.mark.parametrize("value", ["0.0.0.0:8080", ":9090", "localhost:1", "[::]:8080"])
def test_a_listen_address_in_each_form_is_accepted(value: str) -> None:
    assert build_parser().parse_args(["run", "--health", value, "--metrics", value]).health \
        == value


@settings(max_examples=300)
@given(st.text(max_size=30), st.floats(0, 10), st.floats(10, 1e6), st.booleans())
def test_a_bounded_float_is_in_range_or_refused(text: str, low: float, high: float,
                                                low_open: bool) -> None:
    parse = bounded_float(low, high, low_open=low_open)
    try:
        value = parse(text)
    except argparse.ArgumentTypeError as exc:
        assert "\n" not in str(exc)
    else:
        assert math.isfinite(value) and low <= value <= high
        assert not (low_open and value == low)


@settings(max_examples=300)
@given(st.text(max_size=30) | st.integers().map(str))
def test_a_bounded_int_is_in_range_or_refused(text: str) -> None:
    try:
        value = bounded_int(1, 256)(text)
    except argparse.ArgumentTypeError:
        return
    assert 1 <= value <= 256 and text.strip("+-").isascii()


@pytest.mark.parametrize(("text", "needle"), [
    ("127.0.0.1:²", "port must be 1-65535"), ("127.0.0.1:53:53", "HOST:PORT has one colon"),
    ("127.0.0.1:0", "port must be"), ("127.0.0.1:65536", "port must be"),
    ("127.0.0.1:", "port must be"), ("[::1", r"expected \[ADDRESS\]:PORT"),
    ("[::1]x", r"expected \[ADDRESS\]:PORT"), ("[1.2.3.4]:53", "not an IPv6 address"),
    (":53", "no host"), ("bad host:53", "not an IP address or a host name"),
    ("a\nb", "not an IP address or a host name"),
])
def test_a_nameserver_is_parsed_strictly(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_nameserver(text)


@pytest.mark.parametrize(("text", "address"), [
    ("127.0.0.1", ("127.0.0.1", 53)), ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("::1", ("::1", 53)), ("[::1]:5353", ("::1", 5353)), ("[::1]", ("::1", 53)),
])
def test_a_nameserver_in_each_documented_form_is_read(text: str,
                                                      address: tuple[str, int]) -> None:
    assert parse_nameserver(text) == address


@settings(max_examples=300)
@given(st.text(max_size=8))
def test_a_port_is_ascii_digits_in_range_or_refused(port: str) -> None:
    try:
        _, value = parse_nameserver(f"127.0.0.1:{port}")
    except ValueError as exc:
        assert "\n" not in str(exc)
    else:
        assert port.isascii() and port.isdigit() and 1 <= value <= 65535


def test_the_ca_file_must_be_a_regular_file_of_pem_certificates(tmp_path: object) -> None:
    assert check_ca_file("/dev/null") == "/dev/null: not a regular file"
    assert check_ca_file("/nonexistent/ca.pem") == "/nonexistent/ca.pem: no such file"
    assert check_ca_file("/") == "/: not a regular file"
    why = check_ca_file("/etc/hostname")
    assert why is not None and "no PEM certificate" in why


@pytest.mark.parametrize("argv", [
    ["discover", "--ca-file", "/dev/null", "a.example"],
    ["discover", "--nameserver", "127.0.0.1:53:53", "a.example"],
    ["discover", "--nameserver", "127.0.0.1:²", "a.example"],
])
def test_discover_refuses_bad_lookup_options_before_any_lookup(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert len(capsys.readouterr().err.splitlines()) == 1
