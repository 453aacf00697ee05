"""Durations and byte sizes: mtg's ``TypeDuration`` and ``TypeBytes``, parsed and printed.

- :func:`parse_duration` reads Go's ``time.ParseDuration`` syntax after lower-casing and
  removing blanks (``"1m30s"``, ``"5 S"``) and returns seconds; :func:`format_duration`
  prints seconds as Go's ``Duration.String()`` does (``"5m0s"``).
- :func:`parse_bytes` reads alecthomas/units sizes (``"1mb"``, ``"1.5MiB"``; every unit a
  power of 1024) and returns bytes; :func:`format_bytes` prints them as mtg does (``"1mib"``).

The results match what mtg computes for the same text, fractions and overflows included.
``0`` parses to 0, which the TOML walker reads as "use the default".
"""

from __future__ import annotations

from collections.abc import Mapping

from mtgworkers.config.errors import ConfigError

__all__ = ["format_bytes", "format_duration", "parse_bytes", "parse_duration"]

_NS_PER_UNIT = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # MICRO SIGN
    "\u03bcs": 1_000,  # GREEK SMALL LETTER MU
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_INT64_LIMIT = 1 << 63
_DIGITS = "0123456789"


def parse_duration(text: str) -> float:
    """Parse an mtg duration (Go syntax after lower-casing and removing spaces and tabs).

    ``"1m30s"`` -> 90.0, ``"5 S"`` -> 5.0, ``"0"`` -> 0.0 (0 means "use the default").
    Returns seconds. Raises ConfigError for syntax errors, bare numbers other than ``0``,
    overflow and negative durations.
    """
    cleaned = text.lower().replace(" ", "").replace("\t", "")
    try:
        nanoseconds = _go_duration_ns(cleaned)
    except _Invalid as exc:
        raise ConfigError(f"incorrect duration ({text}): {exc}") from None
    if nanoseconds < 0:
        raise ConfigError(f"duration has to be a positive: {text}")
    return nanoseconds / 1e9


class _Invalid(Exception):
    """Internal: reason of a syntax error, wrapped into a ConfigError by the caller."""

    def __init__(self, reason: str, *, unknown_unit: bool = False) -> None:
        super().__init__(reason)
        self.unknown_unit = unknown_unit


def _go_duration_ns(text: str) -> int:
    # Mirrors Go's time.ParseDuration, including how fractions are rounded: the result must
    # match what mtg computes for the same string.
    quoted = '"' + text + '"'
    rest = text
    negative = False
    if rest[:1] in ("-", "+"):
        negative = rest[0] == "-"
        rest = rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise _Invalid(f"invalid duration {quoted}")
    total = 0
    while rest:
        if rest[0] != "." and rest[0] not in _DIGITS:
            raise _Invalid(f"invalid duration {quoted}")
        whole, rest = _split_digits(rest)
        has_whole = bool(whole)
        # The length check keeps int() away from huge digit strings (and its 4300-digit limit).
        significant = whole.lstrip("0")
        if len(significant) > 19 or int(significant or "0") > _INT64_LIMIT:
            raise _Invalid(f"invalid duration {quoted}")
        value = int(significant or "0")
        fraction, scale, has_fraction = 0, 1.0, False
        if rest[:1] == ".":
            digits, rest = _split_digits(rest[1:])
            has_fraction = bool(digits)
            for digit in digits:
                # Go stops accumulating (but keeps consuming) once the fraction would overflow.
                if fraction > (_INT64_LIMIT - 1) // 10:
                    break
                candidate = fraction * 10 + int(digit)
                if candidate > _INT64_LIMIT:
                    break
                fraction = candidate
                scale *= 10
        if not has_whole and not has_fraction:
            raise _Invalid(f"invalid duration {quoted}")
        end = 0
        while end < len(rest) and rest[end] != "." and rest[end] not in _DIGITS:
            end += 1
        unit_name, rest = rest[:end], rest[end:]
        if not unit_name:
            raise _Invalid(f"missing unit in duration {quoted}")
        unit = _NS_PER_UNIT.get(unit_name)
        if unit is None:
            raise _Invalid(f'unknown unit "{unit_name}" in duration {quoted}')
        if value > _INT64_LIMIT // unit:
            raise _Invalid(f"invalid duration {quoted}")
        value *= unit
        if fraction:
            value += int(float(fraction) * (float(unit) / scale))
        total += value
        if value > _INT64_LIMIT or total > _INT64_LIMIT:
            raise _Invalid(f"invalid duration {quoted}")
    if negative:
        return -total
    if total > _INT64_LIMIT - 1:
        raise _Invalid(f"invalid duration {quoted}")
    return total


def _split_digits(text: str) -> tuple[str, str]:
    end = 0
    while end < len(text) and text[end] in _DIGITS:
        end += 1
    return text[:end], text[end:]


def format_duration(seconds: float) -> str:
    """Format seconds like Go's ``time.Duration.String()``: ``"5m0s"``, ``"1.5s"``, ``"300ms"``."""
    nanoseconds = round(seconds * 1e9)
    sign = "-" if nanoseconds < 0 else ""
    nanoseconds = abs(nanoseconds)
    if nanoseconds == 0:
        return "0s"
    if nanoseconds < 1_000:
        return f"{sign}{nanoseconds}ns"
    if nanoseconds < 1_000_000:
        return sign + _decimal(nanoseconds, 3) + "\u00b5s"
    if nanoseconds < 1_000_000_000:
        return sign + _decimal(nanoseconds, 6) + "ms"
    hours, rest = divmod(nanoseconds, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    text = _decimal(rest, 9) + "s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return sign + text


def _decimal(value: int, decimals: int) -> str:
    whole, fraction = divmod(value, 10**decimals)
    digits = str(fraction).rjust(decimals, "0").rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)


_BYTE_UNITS_IEC = {"B": 1.0} | {p + "iB": float(1024**n) for n, p in enumerate("KMGTPE", 1)}
_BYTE_UNITS_OLD = {"B": 1.0} | {p + "B": float(1024**n) for n, p in enumerate("KMGTPE", 1)}


def parse_bytes(text: str) -> int:
    """Parse an mtg byte size: units B, KB/KiB ... EB/EiB, all powers of 1024, case-insensitive.

    ``"1mb"`` -> 1048576, ``"1.5MB"`` -> 1572864, ``"1MB512KB"`` -> 1572864, ``"0"`` -> 0
    (0 means "use the default"). A number needs a unit. Raises ConfigError.
    """
    cleaned = text.upper().replace(" ", "").replace("\t", "").replace("IB", "iB")
    # Like alecthomas/units: one spelling family per value ("1MiB512KiB" or "1MB512KB").
    try:
        value = _parse_units(cleaned, _BYTE_UNITS_IEC)
    except _Invalid as iec_error:
        try:
            value = _parse_units(cleaned, _BYTE_UNITS_OLD)
        except _Invalid as old_error:
            # Report what went wrong with the spelling that was actually used.
            reason = old_error if iec_error.unknown_unit else iec_error
            raise ConfigError(f"incorrect bytes value ({text}): {reason}") from None
    if value < 0:
        raise ConfigError(f"bytes should be positive ({text})")
    return value


def format_bytes(size: int) -> str:
    """Format a byte size as mtg prints it: ``1048576`` -> ``"1mib"``, ``1025`` -> ``"1kib1b"``."""
    if size == 0:
        return "0b"
    parts = []
    for power, name in reversed(list(enumerate(("b", "kib", "mib", "gib", "tib", "pib", "eib")))):
        count, size = divmod(size, 1024**power)
        if count:
            parts.append(f"{count}{name}")
    return "".join(parts)


def _parse_units(text: str, units: Mapping[str, float]) -> int:
    # Mirrors alecthomas/units.ParseUnit: float accumulation, truncation to an integer.
    rest = text
    negative = False
    if rest[:1] in ("-", "+"):
        negative = rest[0] == "-"
        rest = rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise _Invalid(f"invalid {text}")
    total = 0.0
    while rest:
        if rest[0] != "." and rest[0] not in _DIGITS:
            raise _Invalid(f"invalid {text}")
        whole, rest = _split_digits(rest)
        number = float(_units_int(whole, text))
        fraction = ""
        if rest[:1] == ".":
            fraction, rest = _split_digits(rest[1:])
            scale = 1.0
            for _ in fraction:  # repeated multiplication, like Go (10.0 ** n rounds differently)
                scale *= 10
            number += float(_units_int(fraction, text)) / scale
        if not whole and not fraction:
            raise _Invalid(f"invalid {text}")
        end = 0
        while end < len(rest) and rest[end] != "." and rest[end] not in _DIGITS:
            end += 1
        unit_name, rest = rest[:end], rest[end:]
        if not unit_name:
            raise _Invalid(f"missing unit in {text}")
        unit = units.get(unit_name)
        if unit is None:
            raise _Invalid(f"unknown unit {unit_name} in {text}", unknown_unit=True)
        total += number * unit
    if negative:
        total = -total
    # Go converts to int64 after this check; 2**63 itself does not fit (Go ends up negative).
    if not -float(_INT64_LIMIT) <= total < float(_INT64_LIMIT):
        raise _Invalid("overflow parsing unit")
    return int(total)


def _units_int(digits: str, text: str) -> int:
    value = 0
    for digit in digits:
        if value >= (_INT64_LIMIT - 1 - 10) // 10:
            raise _Invalid(f"invalid {text}")
        value = value * 10 + int(digit)
    return value
