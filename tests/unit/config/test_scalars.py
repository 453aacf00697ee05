"""prefer-ip, tag formats, metric prefixes, HTTP paths, bounded numbers, paths and DC
numbers (mtgworkers.config.scalars)."""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtgworkers import dcs
from mtgworkers.config import (
    MAX_WORKERS,
    PREFER_IP_VALUES,
    ConfigError,
    PreferIP,
    parse_ca_file,
    parse_concurrency,
    parse_dc_number,
    parse_error_rate,
    parse_http_path,
    parse_metric_prefix,
    parse_pid_file,
    parse_prefer_ip,
    parse_tag_format,
    parse_workers,
)
from tests.unit.config.helpers import HOSTILE_TEXT, raises_only_config_error

# ---------------------------------------------------------------------------------------------
# Bounded integers: concurrency (TypeConcurrency), [supervisor] workers


@pytest.mark.parametrize("value", [1, 2, 9, 8192, 65535])
def test_parse_concurrency_ok(value: int) -> None:
    assert parse_concurrency(value) == value


@pytest.mark.parametrize("value", [0, -1, 65536, 2**40])
def test_parse_concurrency_errors(value: int) -> None:
    with pytest.raises(ConfigError) as info:
        parse_concurrency(value)
    assert str(info.value) == f"value should be 1..65535 ({value})"


@pytest.mark.parametrize("value", [1, 2, 64, MAX_WORKERS])
def test_parse_workers_ok(value: int) -> None:
    assert parse_workers(value) == value


@pytest.mark.parametrize("value", [0, -1, MAX_WORKERS + 1, 2**40])
def test_parse_workers_errors(value: int) -> None:
    with pytest.raises(ConfigError) as info:
        parse_workers(value)
    assert str(info.value) == f"value should be 0..256 (0 = one per CPU) ({value})"


# ---------------------------------------------------------------------------------------------
# Error rate, prefer-ip, tag format, metric prefix, http path


@pytest.mark.parametrize("value", [0.001, 1.0, 50.0, 99.999, 1e-9])
def test_parse_error_rate_ok(value: float) -> None:
    assert parse_error_rate(value) == value


# mtg's type_error_rate_test.go rejects "1e2" and "-1.0"; its other cases are not numbers,
# which TOML itself cannot express as a float (see test_wrong_toml_type).
@pytest.mark.parametrize("value", [1e2, -1.0, 0.0, 100.5, math.inf, -math.inf, math.nan])
def test_parse_error_rate_errors(value: float) -> None:
    with pytest.raises(ConfigError, match="0 < x < 100"):
        parse_error_rate(value)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("prefer-ipv4", "prefer-ipv4"),
        ("prefer-ipv6", "prefer-ipv6"),
        ("only-ipv4", "only-ipv4"),
        ("only-ipv6", "only-ipv6"),
        ("ONLY-IPV4", "only-ipv4"),
        ("Prefer-IPv6", "prefer-ipv6"),
    ],
)
def test_parse_prefer_ip_ok(text: str, value: str) -> None:
    parsed = parse_prefer_ip(text)
    assert parsed == value
    assert parsed is PreferIP(value)
    assert str(parsed) == f"{parsed}" == value


@pytest.mark.parametrize(
    "text", ["", "prefer", "preferipv4", "prefer-ipv4_", "ipv4", " only-ipv4", "ONLY-IPV5"]
)
def test_parse_prefer_ip_errors(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_prefer_ip(text)
    assert str(info.value) == f"unsupported ip preference: {text.lower()}"


def test_prefer_ip_is_one_enum() -> None:
    assert [member.value for member in PreferIP] == [
        "prefer-ipv6",
        "prefer-ipv4",
        "only-ipv6",
        "only-ipv4",
    ]
    assert tuple(member.value for member in PreferIP) == PREFER_IP_VALUES
    # the DC table takes the same values (and plain strings, case-insensitively)
    assert dcs.PREFER_IP_VALUES is PREFER_IP_VALUES
    assert PreferIP.ONLY_IPV4 == "only-ipv4"
    assert json.dumps({"prefer-ip": PreferIP.ONLY_IPV6}) == '{"prefer-ip": "only-ipv6"}'


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("datadog", "datadog"),
        ("influxdb", "influxdb"),
        ("graphite", "graphite"),
        ("DATADOG", "datadog"),
        ("InfluxDB", "influxdb"),
        ("GRAPHITE", "graphite"),
    ],
)
def test_parse_tag_format_ok(text: str, value: str) -> None:
    assert parse_tag_format(text) == value


@pytest.mark.parametrize("text", ["", "dogdog", "statsd", "datadog "])
def test_parse_tag_format_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="unknown tag format"):
        parse_tag_format(text)


@pytest.mark.parametrize("text", ["mtg", "abc123", "0", "mtgproxy"])
def test_parse_metric_prefix_ok(text: str) -> None:
    assert parse_metric_prefix(text) == text


@pytest.mark.parametrize(
    # mtg's type_metric_prefix_test.go, then: no dots, no upper case, no trailing newline
    "text",
    ["", "-", "hello/world", "lala*", "++sdf++", "mtg.", "MTG", "mtg\n", "mtg_proxy"],
)
def test_parse_metric_prefix_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="incorrect metric prefix"):
        parse_metric_prefix(text)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        # mtg's type_http_path_test.go
        ("", "/"),
        ("/", "/"),
        ("/path", "/path"),
        ("path", "/path"),
        # more
        ("/metrics/", "/metrics"),
        ("//a/b//", "/a/b"),
        ("///", "/"),
    ],
)
def test_parse_http_path(text: str, path: str) -> None:
    assert parse_http_path(text) == path


# ---------------------------------------------------------------------------------------------
# Paths: [supervisor] pid-file, [doctor] ca-file


def test_parse_pid_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_pid_file("/run/mtgworkers.pid") == "/run/mtgworkers.pid"
    assert parse_pid_file("/run/../run/x.pid", base_dir="/etc") == "/run/x.pid"
    assert parse_pid_file("run/x.pid", base_dir=str(tmp_path)) == str(tmp_path / "run" / "x.pid")
    monkeypatch.chdir(tmp_path)
    assert parse_pid_file("x.pid") == str(tmp_path / "x.pid")  # need not exist


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a\x00b", "path contains a NUL character"),
        ("run/", "value is a path to a directory: {base}/run"),
        ("sub", "value is a path to a directory: {base}/sub"),
        (".", "value is a path to a directory: {base}"),
    ],
)
def test_parse_pid_file_errors(tmp_path: pathlib.Path, text: str, message: str) -> None:
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError) as info:
        parse_pid_file(text, base_dir=str(tmp_path))
    assert str(info.value) == message.format(base=tmp_path)


def test_parse_ca_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ca.pem").write_text("")
    assert parse_ca_file(str(tmp_path / "ca.pem")) == str(tmp_path / "ca.pem")
    assert parse_ca_file("ca.pem", base_dir=str(tmp_path)) == str(tmp_path / "ca.pem")
    monkeypatch.chdir(tmp_path)
    assert parse_ca_file("./ca.pem") == str(tmp_path / "ca.pem")


def test_parse_ca_file_errors(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError) as info:
        parse_ca_file(str(missing))
    assert str(info.value) == f"cannot use file {missing}: no such file or directory"
    with pytest.raises(ConfigError) as info:
        parse_ca_file("a\x00b", base_dir=str(tmp_path))
    assert str(info.value).startswith(f"cannot use file {tmp_path}/a\x00b: ")
    with pytest.raises(ConfigError) as info:
        parse_ca_file(str(tmp_path))
    assert str(info.value) == f"value is not a regular file: {tmp_path}"
    locked = tmp_path / "locked.pem"
    locked.write_text("")
    locked.chmod(0)
    if os.geteuid() == 0:  # root may read anything: pretend the permission check says no
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError) as info:
        parse_ca_file(str(locked))
    assert str(info.value) == f"value is a path to a file that is not readable: {locked}"


# ---------------------------------------------------------------------------------------------
# [dc-overrides] keys


@pytest.mark.parametrize(
    ("text", "dc"),
    [("2", 2), ("-2", -2), ("10002", 10002), ("203", 203), ("32767", 32767), ("-32768", -32768)],
)
def test_parse_dc_number_ok(text: str, dc: int) -> None:
    assert parse_dc_number(text) == dc


@pytest.mark.parametrize(
    "text", ["0", "-0", "02", "+2", "abc", "", "32768", "-32769", "2.0", " 2", "1" * 5000]
)
def test_parse_dc_number_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="incorrect dc number"):
        parse_dc_number(text)


# ---------------------------------------------------------------------------------------------
# Fuzzing: hostile input raises ConfigError and nothing else


@pytest.mark.parametrize(
    "parser",
    [
        parse_prefer_ip,
        parse_tag_format,
        parse_metric_prefix,
        parse_http_path,
        parse_dc_number,
        lambda text: parse_pid_file(text, base_dir="/nonexistent-base-dir"),
        lambda text: parse_ca_file(text, base_dir="/nonexistent-base-dir"),
    ],
)
@settings(max_examples=150, deadline=None)
@given(text=HOSTILE_TEXT)
def test_text_parsers_raise_only_config_error(parser: Any, text: str) -> None:
    raises_only_config_error(parser, text)


@pytest.mark.parametrize("parser", [parse_concurrency, parse_workers])
@given(value=st.integers())
def test_integer_parsers_raise_only_config_error(parser: Any, value: int) -> None:
    raises_only_config_error(parser, value)


@given(value=st.floats())
def test_parse_error_rate_raises_only_config_error(value: float) -> None:
    raises_only_config_error(parse_error_rate, value)
