"""Durations and byte sizes (mtgworkers.config.units): mtg's type_duration_test.go and
type_bytes_test.go examples, Go's rounding and overflow rules, round trips, fuzzing."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtgworkers.config import (
    ConfigError,
    format_bytes,
    format_duration,
    parse_bytes,
    parse_duration,
)
from tests.unit.config.helpers import HOSTILE_TEXT, raises_only_config_error

# ---------------------------------------------------------------------------------------------
# Durations (TypeDuration)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        # mtg's type_duration_test.go
        ("1s", 1.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("1\tM", 60.0),
        ("1H", 3600.0),
        ("1 h", 3600.0),
        # docs/mtg-compat.md a.2
        ("5s", 5.0),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("300ms", 0.3),
        ("5 S", 5.0),
        ("5M", 300.0),
        ("0ms", 0.0),
        ("1h0m0s", 3600.0),
        ("5\u00b5s", 5e-6),  # MICRO SIGN
        ("5\u03bcs", 5e-6),  # GREEK SMALL LETTER MU
        ("5\u039cS", 5e-6),  # capital mu lower-cases to the Greek small mu
        ("5us", 5e-6),
        ("7ns", 7e-9),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("+5s", 5.0),
        ("-0", 0.0),
        ("-0s", 0.0),
        ("1h1m1s1ms", 3661.001),
        ("2562047h47m16.854775807s", 9223372036.854775807),  # Go's maximum
        ("0" * 5000 + "1s", 1.0),
        ("1." + "0" * 5000 + "1s", 1.0),
    ],
)
def test_parse_duration_ok(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # mtg's type_duration_test.go
        ("-1s", "duration has to be a positive"),
        ("1 seconds ago", 'unknown unit "secondsago"'),
        ("1s ago", 'unknown unit "sago"'),
        ("", "invalid duration"),
        # bare numbers need a unit, except "0"
        ("5", "missing unit"),
        ("0.5", "missing unit"),
        ("1d", 'unknown unit "d"'),
        ("s", "invalid duration"),
        (".s", "invalid duration"),
        ("1e3s", 'unknown unit "e"'),
        ("- 5s", "duration has to be a positive"),
        ("--5s", "invalid duration"),
        ("1s 5", "missing unit"),
        ("9223372036854775808ns", "invalid duration"),
        ("2562047h47m16.854775808s", "invalid duration"),
        ("1_000s", 'unknown unit "_"'),
        ("1" * 5000 + "s", "invalid duration"),
    ],
)
def test_parse_duration_errors(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_duration(text)


def test_parse_duration_fraction_rounds_like_go() -> None:
    # Go: v += uint64(float64(f) * (float64(unit) / scale)), truncated to whole nanoseconds.
    assert parse_duration("0.3333333333333333333h") * 1e9 == pytest.approx(1.2e12)
    assert parse_duration("1.0000000001s") == pytest.approx(1.0000000001)  # 0.1 ns dropped
    assert parse_duration("1.9999999999ns") == pytest.approx(1e-9)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (3.0, "3s"),
        (10.0, "10s"),
        (300.0, "5m0s"),
        (5400.0, "1h30m0s"),
        (21600.0, "6h0m0s"),
        (1.5, "1.5s"),
        (0.3, "300ms"),
        (5e-6, "5\u00b5s"),
        (7e-9, "7ns"),
        (90.25, "1m30.25s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**15))
def test_format_duration_round_trips(nanoseconds: int) -> None:
    seconds = nanoseconds / 1e9
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Byte sizes (TypeBytes)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        # mtg's type_bytes_test.go
        ("1b", 1),
        ("1kb", 1024),
        ("1kib", 1024),
        ("2mb", 2 * 1024 * 1024),
        ("2mib", 2 * 1024 * 1024),
        # docs/mtg-compat.md a.2
        ("1mb", 1048576),
        ("1mib", 1048576),
        ("512kib", 524288),
        ("1.5MB", 1572864),
        ("1MB512KB", 1572864),
        ("1MiB512KiB", 1572864),
        ("0", 0),
        ("1 MiB", 1048576),
        ("1\tgb", 1024**3),
        ("1TiB", 1024**4),
        ("1pb", 1024**5),
        ("1eib", 1024**6),
        ("7EB", 7 * 1024**6),
        ("+1kb", 1024),
        (".5kb", 512),
        ("0.1b", 0),  # truncated to 0, which means "use the default"
        ("1KB1B", 1025),
        ("1." + "0" * 5000 + "1kb", 1024),
    ],
)
def test_parse_bytes_ok(text: str, size: int) -> None:
    assert parse_bytes(text) == size


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # mtg's type_bytes_test.go
        ("1m", "unknown unit M"),
        ("1", "missing unit"),
        ("-1kb", "bytes should be positive"),
        ("-1kib", "bytes should be positive"),
        # spelling families cannot be mixed (alecthomas/units tries one map, then the other)
        ("1MB512KiB", "unknown unit"),
        ("", "invalid"),
        ("kb", "invalid"),
        ("1.5", "missing unit"),
        ("1xb", "unknown unit"),
        ("8EB", "overflow"),
        ("7eib1023pib1023tib1023gib1023mib1023kib1023b", "overflow"),  # float64 sum = 2**63
        ("1,5mb", "unknown unit"),
        ("1ib", "unknown unit"),
        ("1" * 5000 + "b", "invalid"),
    ],
)
def test_parse_bytes_errors(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_bytes(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0b"),
        (1, "1b"),
        (1024, "1kib"),
        (1048576, "1mib"),
        (1572864, "1mib512kib"),
        (1025, "1kib1b"),
        (7 * 1024**6, "7eib"),
    ],
)
def test_format_bytes(size: int, text: str) -> None:
    assert format_bytes(size) == text


# Sizes are summed as float64 (like mtg), so exact only up to 2**53.
@given(st.integers(min_value=1, max_value=2**53))
def test_format_bytes_round_trips(size: int) -> None:
    assert parse_bytes(format_bytes(size)) == size


# ---------------------------------------------------------------------------------------------
# Fuzzing: hostile text raises ConfigError and nothing else

UNITS_TEXT = st.text(alphabet="0123456789.+- \tnsuµμmhkKMGTPEiIbB", max_size=30)


@pytest.mark.parametrize("parser", [parse_duration, parse_bytes])
@settings(max_examples=300, deadline=None)
@given(text=st.one_of(HOSTILE_TEXT, UNITS_TEXT))
def test_parsers_raise_only_config_error(parser: Any, text: str) -> None:
    raises_only_config_error(parser, text)


@settings(max_examples=300, deadline=None)
@given(text=UNITS_TEXT)
def test_parsed_values_print_and_parse_back(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ConfigError:
        pass
    else:
        assert seconds >= 0
        again = parse_duration(format_duration(seconds))
        assert again == pytest.approx(seconds, rel=1e-12, abs=1e-9)
    try:
        size = parse_bytes(text)
    except ConfigError:
        pass
    else:
        assert size >= 0
        if size <= 2**53:  # sizes are summed as float64 (like mtg): exact up to here
            assert parse_bytes(format_bytes(size)) == size
