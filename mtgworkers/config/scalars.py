"""Single values that are neither addresses, URLs nor durations: enumerations, bounded
integers and floats, metric names and file paths.

- :class:`PreferIP` (``prefer-ip``), the one list of IP preferences: config, the DC table
  (:mod:`mtgworkers.dcs`) and simple-run's ``--prefer-ip`` all use it;
- statsd ``tag-format`` (:data:`TAG_FORMATS`), ``metric-prefix``, Prometheus ``http-path``;
- integers: ``concurrency`` and its kin, ``[supervisor] workers``, ``[dc-overrides]`` keys;
- the anti-replay ``error-rate``;
- paths: ``[supervisor] pid-file`` and ``[doctor] ca-file``, returned absolute.

Each parser raises :class:`~mtgworkers.config.errors.ConfigError` with the reason only.
"""

from __future__ import annotations

import enum
import math
import os
import re
import stat

from mtgworkers.config.errors import ConfigError

__all__ = [
    "MAX_WORKERS",
    "PREFER_IP_VALUES",
    "TAG_FORMATS",
    "PreferIP",
    "parse_ca_file",
    "parse_concurrency",
    "parse_dc_number",
    "parse_error_rate",
    "parse_http_path",
    "parse_metric_prefix",
    "parse_pid_file",
    "parse_prefer_ip",
    "parse_tag_format",
    "parse_workers",
]


class PreferIP(str, enum.Enum):
    """``prefer-ip``: which family of Telegram DC addresses is tried first, or the only one.

    A ``str`` enum: members compare equal to their text (``PreferIP.ONLY_IPV4 ==
    "only-ipv4"``) and ``str()`` gives the text, as the config file spells it.
    """

    PREFER_IPV6 = "prefer-ipv6"
    PREFER_IPV4 = "prefer-ipv4"
    ONLY_IPV6 = "only-ipv6"
    ONLY_IPV4 = "only-ipv4"

    def __str__(self) -> str:
        return self.value


# The values in the order the usage text and messages list them (the default first).
PREFER_IP_VALUES = tuple(member.value for member in PreferIP)
TAG_FORMATS = ("datadog", "influxdb", "graphite")

# [supervisor] workers: at most this many worker processes (0 means one per CPU).
MAX_WORKERS = 256


def parse_prefer_ip(text: str) -> PreferIP:
    """Parse ``prefer-ip`` (case-insensitive): prefer-ipv4, prefer-ipv6, only-ipv4, only-ipv6."""
    value = text.lower()
    try:
        return PreferIP(value)
    except ValueError:
        raise ConfigError(f"unsupported ip preference: {value}") from None


def parse_tag_format(text: str) -> str:
    """Parse a statsd tag format (case-insensitive): datadog, influxdb or graphite."""
    value = text.lower()
    if value not in TAG_FORMATS:
        raise ConfigError(f"unknown tag format {text}")
    return value


_METRIC_PREFIX_RE = re.compile(r"[a-z0-9]+")


def parse_metric_prefix(text: str) -> str:
    """Check a metric prefix against ``^[a-z0-9]+$``. Raises ConfigError."""
    if not _METRIC_PREFIX_RE.fullmatch(text):
        raise ConfigError(f"incorrect metric prefix {text}: must match ^[a-z0-9]+$")
    return text


def parse_http_path(text: str) -> str:
    """Normalise a Prometheus HTTP path: ``"metrics/"`` -> ``"/metrics"``, ``""`` -> ``"/"``."""
    return "/" + text.strip("/")


def parse_concurrency(value: int) -> int:
    """Check an mtg "concurrency" integer (16-bit unsigned, > 0); 0 is handled by the caller."""
    if not 1 <= value <= 65535:
        raise ConfigError(f"value should be 1..65535 ({value})")
    return value


def parse_workers(value: int) -> int:
    """Check ``[supervisor] workers``: 1..MAX_WORKERS (0, one per CPU, is handled by the caller)."""
    if not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f"value should be 0..{MAX_WORKERS} (0 = one per CPU) ({value})")
    return value


def parse_pid_file(text: str, base_dir: str | None = None) -> str:
    """Parse ``[supervisor] pid-file``: a file path, returned absolute.

    A relative path is resolved against ``base_dir`` (default: the working directory). The
    file is written when the proxy starts, so it need not exist; a path ending in ``/`` or
    naming a directory is an error. Raises ConfigError.
    """
    if "\x00" in text:
        raise ConfigError("path contains a NUL character")
    path = os.path.abspath(os.path.join(base_dir, text) if base_dir else text)
    if text.endswith(("/", os.sep)) or os.path.isdir(path):
        raise ConfigError(f"value is a path to a directory: {path}")
    return path


def parse_error_rate(value: float) -> float:
    """Check an anti-replay error rate: a float with 0 < x < 100. Raises ConfigError."""
    if math.isnan(value) or not 0.0 < value < 100.0:
        raise ConfigError(f"value should be 0 < x < 100 ({value})")
    return value


def parse_ca_file(text: str, base_dir: str | None = None) -> str:
    """Parse ``[doctor] ca-file``: an existing readable regular file, returned absolute.

    A relative path is resolved against ``base_dir`` (default: the working directory).
    The content (PEM certificates) is read when doctor runs. Raises ConfigError.
    """
    path = os.path.abspath(os.path.join(base_dir, text) if base_dir else text)
    try:
        info = os.stat(path)
    except (OSError, ValueError) as exc:  # ValueError: embedded NUL
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot use file {path}: {reason.lower()}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"value is not a regular file: {path}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"value is a path to a file that is not readable: {path}")
    return path


_DC_RE = re.compile(r"-?[1-9][0-9]*")


def parse_dc_number(text: str) -> int:
    """Parse a ``[dc-overrides]`` key: a non-zero DC number in int16 range, written canonically.

    ``"2"`` -> 2, ``"-2"`` -> -2 (media), ``"10002"`` -> 10002 (test DC). Raises ConfigError.
    """
    if len(text) > 6 or not _DC_RE.fullmatch(text) or not -32768 <= int(text) <= 32767:
        raise ConfigError(
            "incorrect dc number: expected a non-zero integer like 2, -2 or 10002 "
            "(within -32768..32767)"
        )
    return int(text)
