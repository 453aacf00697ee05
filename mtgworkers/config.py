"""Configuration file -> frozen dataclasses (mtg v2 compatible, see mtg-compat.md part (a)).

The file is TOML with mtg v2's keys and value syntaxes. Like mtg, every value is validated at
load time, a key set to its zero value (``false``, ``0``, ``""``) behaves as if it were absent,
and defaults are the ones mtg's code uses (not the values of mtg's example file).

Deliberate differences to mtg (all documented in ``config.example.toml``):

- Unknown keys, at any level, are errors (mtg ignores them silently, so a typo there goes
  unnoticed).
- Relative paths in ``urls`` of the IP lists are resolved against the directory of the config
  file (mtg: the current working directory).
- Ports written inside URLs (``dns``, ``proxies``) must be 1..65535; a URL ending in ``:`` is
  rejected. A bare IPv6 address is accepted as ``dns`` (mtg's URL parser rejects it), and
  ``doh-ip`` with an IPv6 address becomes ``https://[v6]`` (mtg produces a broken URL).
- List files must be regular files readable by this process.
- Extension: ``[dc-overrides]`` replaces Telegram's built-in addresses of single DCs.
- Extension: ``[doctor]`` names the NTP servers, IP echo services and extra CA certificates
  ``mtgworkers doctor`` uses, and its per-operation timeout.
- Extension: ``[supervisor]`` sets the process model (worker count, graceful timeout, RSS
  limit, pid file); mtg runs one process and has no such table. Without it the defaults
  apply, so mtg config files work unchanged.

Each value syntax has one small function below (``parse_duration``, ``parse_bytes``, ...), the
counterpart of mtg's ``internal/config/type_*.go``. Those functions raise :class:`ConfigError`
with the reason only; :func:`parse` prefixes the full dotted key, e.g.
``network.timeout.idle: duration has to be a positive: -1s``.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
import sys
import types
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mtgworkers.defense.iplist import Network as IPNetwork
from mtgworkers.defense.iplist import _parse_entry as parse_network
from mtgworkers.netaddr import bracket_host, join_host_port
from mtgworkers.protocol.secret import Secret, SecretError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "AntiReplay",
    "Config",
    "ConfigError",
    "Defense",
    "Doctor",
    "DomainFronting",
    "Doppelganger",
    "HostPort",
    "IPListConfig",
    "KeepAlive",
    "Network",
    "Prometheus",
    "ProxyURL",
    "Stats",
    "Statsd",
    "Supervisor",
    "Timeouts",
    "format_bytes",
    "format_duration",
    "format_ntp_server",
    "load",
    "parse",
    "parse_bytes",
    "parse_ca_file",
    "parse_concurrency",
    "parse_dc_address",
    "parse_dc_number",
    "parse_dns",
    "parse_duration",
    "parse_echo_url",
    "parse_error_rate",
    "parse_host_port",
    "parse_http_path",
    "parse_https_url",
    "parse_ip",
    "parse_list_url",
    "parse_metric_prefix",
    "parse_ntp_server",
    "parse_pid_file",
    "parse_port",
    "parse_prefer_ip",
    "parse_proxy_url",
    "parse_tag_format",
    "parse_workers",
]

REDACTED = "REDACTED"

PREFER_IP_VALUES = ("prefer-ipv4", "prefer-ipv6", "only-ipv4", "only-ipv6")
TAG_FORMATS = ("datadog", "influxdb", "graphite")

# [supervisor] workers: at most this many worker processes (0 means one per CPU).
MAX_WORKERS = 256

# [doctor] defaults: public NTP pools/services; the IP echo services are those of
# mtgworkers.publicip (kept there so `access` and `run` use the same list).
DEFAULT_NTP_SERVERS = ("0.pool.ntp.org", "1.pool.ntp.org", "time.google.com", "time.cloudflare.com")
NTP_PORT = 123

# Deprecated keys (mtg spelling, full dotted key), in the order mtg's doctor reports them.
DEPRECATED_KEYS = (
    "domain-fronting-ip",
    "domain-fronting-port",
    "domain-fronting-proxy-protocol",
    "network.doh-ip",
)


class ConfigError(Exception):
    """An invalid configuration. ``str(e)`` names the dotted key and the reason."""


# ---------------------------------------------------------------------------------------------
# Parsed configuration


@dataclass(frozen=True)
class HostPort:
    """An IP literal and a port, e.g. ``bind-to``. ``str()`` gives ``host:port``/``[v6]:port``."""

    host: str
    port: int

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)


@dataclass(frozen=True)
class ProxyURL:
    """One SOCKS5 upstream proxy. ``str()`` and ``repr()`` never show the password."""

    scheme: str  # "socks5" or "socks5h" (both behave the same)
    host: str  # IP literal (normalised) or host name
    port: int = 1080
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        userinfo = ""
        if self.username is not None:
            userinfo = self.username
            if self.password is not None:
                userinfo += ":" + REDACTED
            userinfo += "@"
        return f"{self.scheme}://{userinfo}{join_host_port(self.host, self.port)}"


@dataclass(frozen=True)
class DomainFronting:
    host: str | None = None  # IP to connect to instead of resolving the secret's host name
    port: int = 443
    proxy_protocol: bool = False


@dataclass(frozen=True)
class Timeouts:
    tcp: float | None = None  # None: the OS connect timeout
    http: float | None = None  # None: no limit
    idle: float = 300.0
    handshake: float = 10.0


@dataclass(frozen=True)
class KeepAlive:
    disabled: bool = False
    idle: float = 15.0
    interval: float = 15.0
    count: int = 9


@dataclass(frozen=True)
class Network:
    dns: str | None = None  # None: system resolver; else "udp://IP[:port]", "tls://…", "https://…"
    proxies: tuple[ProxyURL, ...] = ()
    timeout: Timeouts = field(default_factory=Timeouts)
    keep_alive: KeepAlive = field(default_factory=KeepAlive)


@dataclass(frozen=True)
class AntiReplay:
    enabled: bool = False
    max_size: int = 1024 * 1024
    error_rate: float = 0.001


@dataclass(frozen=True)
class IPListConfig:
    enabled: bool = False
    download_concurrency: int = 1
    urls: tuple[str, ...] = ()  # http(s) URLs and absolute file paths
    update_each: float = 6 * 3600.0


@dataclass(frozen=True)
class Doppelganger:
    urls: tuple[str, ...] = ()
    repeats_per_raid: int = 10
    raid_each: float = 6 * 3600.0
    drs: bool = False


@dataclass(frozen=True)
class Defense:
    anti_replay: AntiReplay = field(default_factory=AntiReplay)
    blocklist: IPListConfig = field(default_factory=IPListConfig)
    allowlist: IPListConfig = field(default_factory=IPListConfig)
    doppelganger: Doppelganger = field(default_factory=Doppelganger)


@dataclass(frozen=True)
class Statsd:
    enabled: bool = False
    address: HostPort | None = None
    metric_prefix: str = "mtg."
    tag_format: str = "datadog"


@dataclass(frozen=True)
class Prometheus:
    enabled: bool = False
    bind_to: HostPort | None = None
    http_path: str = "/"
    metric_prefix: str = "mtg"


@dataclass(frozen=True)
class Stats:
    statsd: Statsd = field(default_factory=Statsd)
    prometheus: Prometheus = field(default_factory=Prometheus)


@dataclass(frozen=True)
class Supervisor:
    """EXTENSION (not in mtg): the ``[supervisor]`` table, the process model."""

    workers: int = 0  # 0: one worker per CPU this process may run on
    graceful_timeout: float = 30.0  # how long retiring workers may drain their sessions
    worker_max_rss: int | None = None  # bytes; None: no limit
    pid_file: str | None = None  # absolute path; None: no pid file


@dataclass(frozen=True)
class Doctor:
    """EXTENSION (not in mtg): the ``[doctor]`` table, the endpoints ``doctor`` talks to."""

    # (host, port) pairs; hosts are IP literals or names (resolved with [network] dns).
    ntp_servers: tuple[tuple[str, int], ...] = tuple(
        (host, NTP_PORT) for host in DEFAULT_NTP_SERVERS
    )
    # http(s) URLs; () = $MTGWORKERS_IP_ECHO_URLS, else mtgworkers.publicip.DEFAULT_URLS.
    ip_echo_urls: tuple[str, ...] = ()
    ca_file: str | None = None  # absolute path of extra trusted CA certificates (PEM)
    timeout: float = 5.0  # seconds for each network operation of doctor


def _empty_overrides() -> Mapping[int, tuple[tuple[str, int], ...]]:
    return types.MappingProxyType({})


@dataclass(frozen=True)
class Config:
    """The whole configuration, defaults applied (mtg's code defaults)."""

    secret: Secret
    bind_to: HostPort
    debug: bool = False
    proxy_protocol_listener: bool = False
    # EXTENSION: networks allowed to send a PROXY header; None = anyone (mtg's behaviour)
    proxy_protocol_trusted: tuple[IPNetwork, ...] | None = None
    concurrency: int = 4096
    prefer_ip: str = "prefer-ipv6"
    public_ipv4: str | None = None
    public_ipv6: str | None = None
    auto_update: bool = False
    tolerate_time_skewness: float = 3.0
    allow_fallback_on_unknown_dc: bool = False
    domain_fronting: DomainFronting = field(default_factory=DomainFronting)
    network: Network = field(default_factory=Network)
    defense: Defense = field(default_factory=Defense)
    stats: Stats = field(default_factory=Stats)
    supervisor: Supervisor = field(default_factory=Supervisor)
    doctor: Doctor = field(default_factory=Doctor)
    dc_overrides: Mapping[int, tuple[tuple[str, int], ...]] = field(
        default_factory=_empty_overrides
    )
    # Deprecated keys that were set (non-zero), spelled as in DEPRECATED_KEYS.
    deprecated: tuple[str, ...] = ()

    def to_json_dict(self) -> dict[str, Any]:
        """Return the configuration as JSON-able data shaped like the TOML file.

        Defaults are filled in; the secret key and every password (proxies, URLs with user
        info) are replaced by ``REDACTED``; durations and sizes are strings as mtg prints them
        (``"5m0s"``, ``"1mib"``), so apart from the secrets the result is a valid configuration.
        """
        keep_alive = self.network.keep_alive
        timeout = self.network.timeout
        defense = self.defense
        statsd = self.stats.statsd
        prometheus = self.stats.prometheus
        return {
            "debug": self.debug,
            "secret": {"key": REDACTED, "host": self.secret.host},
            "bind-to": str(self.bind_to),
            "proxy-protocol-listener": self.proxy_protocol_listener,
            "proxy-protocol-trusted": None
            if self.proxy_protocol_trusted is None
            else [str(network) for network in self.proxy_protocol_trusted],
            "concurrency": self.concurrency,
            "prefer-ip": self.prefer_ip,
            "public-ipv4": self.public_ipv4,
            "public-ipv6": self.public_ipv6,
            "auto-update": self.auto_update,
            "tolerate-time-skewness": format_duration(self.tolerate_time_skewness),
            "allow-fallback-on-unknown-dc": self.allow_fallback_on_unknown_dc,
            "domain-fronting": {
                "ip": self.domain_fronting.host,
                "port": self.domain_fronting.port,
                "proxy-protocol": self.domain_fronting.proxy_protocol,
            },
            "network": {
                "dns": self.network.dns,
                "proxies": [str(proxy) for proxy in self.network.proxies],
                "timeout": {
                    "tcp": _format_optional_duration(timeout.tcp),
                    "http": _format_optional_duration(timeout.http),
                    "idle": format_duration(timeout.idle),
                    "handshake": format_duration(timeout.handshake),
                },
                "keep-alive": {
                    "disabled": keep_alive.disabled,
                    "idle": format_duration(keep_alive.idle),
                    "interval": format_duration(keep_alive.interval),
                    "count": keep_alive.count,
                },
            },
            "defense": {
                "anti-replay": {
                    "enabled": defense.anti_replay.enabled,
                    "max-size": format_bytes(defense.anti_replay.max_size),
                    "error-rate": defense.anti_replay.error_rate,
                },
                "blocklist": _ip_list_json(defense.blocklist),
                "allowlist": _ip_list_json(defense.allowlist),
                "doppelganger": {
                    "urls": [_redact_url(url) for url in defense.doppelganger.urls],
                    "repeats-per-raid": defense.doppelganger.repeats_per_raid,
                    "raid-each": format_duration(defense.doppelganger.raid_each),
                    "drs": defense.doppelganger.drs,
                },
            },
            "stats": {
                "statsd": {
                    "enabled": statsd.enabled,
                    "address": _format_optional(statsd.address),
                    "metric-prefix": statsd.metric_prefix,
                    "tag-format": statsd.tag_format,
                },
                "prometheus": {
                    "enabled": prometheus.enabled,
                    "bind-to": _format_optional(prometheus.bind_to),
                    "http-path": prometheus.http_path,
                    "metric-prefix": prometheus.metric_prefix,
                },
            },
            "supervisor": {
                "workers": self.supervisor.workers,
                "graceful-timeout": format_duration(self.supervisor.graceful_timeout),
                "worker-max-rss": _format_optional_bytes(self.supervisor.worker_max_rss),
                "pid-file": self.supervisor.pid_file,
            },
            "doctor": {
                "ntp-servers": [format_ntp_server(server) for server in self.doctor.ntp_servers],
                "ip-echo-urls": [_redact_url(url) for url in self.doctor.ip_echo_urls],
                "ca-file": self.doctor.ca_file,
                "timeout": format_duration(self.doctor.timeout),
            },
            "dc-overrides": {
                str(dc): [join_host_port(host, port) for host, port in addresses]
                for dc, addresses in self.dc_overrides.items()
            },
        }


def _ip_list_json(cfg: IPListConfig) -> dict[str, Any]:
    return {
        "enabled": cfg.enabled,
        "download-concurrency": cfg.download_concurrency,
        "urls": [_redact_url(url) for url in cfg.urls],
        "update-each": format_duration(cfg.update_each),
    }


def _format_optional(value: object | None) -> str | None:
    return None if value is None else str(value)


def _format_optional_bytes(size: int | None) -> str | None:
    return None if size is None else format_bytes(size)


def _format_optional_duration(seconds: float | None) -> str | None:
    return None if seconds is None else format_duration(seconds)


# ---------------------------------------------------------------------------------------------
# Value syntaxes (one function per mtg type_*.go)

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


def parse_cidr(text: str) -> IPNetwork:
    """Parse an IP network in CIDR notation, or one address (a /32 or /128 network), with
    the rules of the IP list files (decimal prefix length, no zones). Raises ConfigError."""
    try:
        return parse_network(text)
    except ValueError:
        raise ConfigError(f"incorrect network {text!r}: expected an IP address or CIDR") from None


def parse_ip(text: str) -> str:
    """Parse an IPv4 or IPv6 literal; return its canonical text (IPv4-mapped IPv6 -> IPv4).

    No zones (``%eth0``), no brackets, no leading zeros in IPv4. Raises ConfigError.
    """
    address = _ip_or_none(text)
    if address is None:
        raise ConfigError(f"incorrect ip {text}")
    return address


def _ip_or_none(text: str) -> str | None:
    if "%" in text:  # Python accepts scoped IPv6 addresses, Go's net.ParseIP does not
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # Go keeps IPv4 as IPv4-mapped IPv6 internally; both spellings mean the same host.
        return str(address.ipv4_mapped)
    return str(address)


def parse_port(value: int) -> int:
    """Check a TOML integer port: 1..65535 (the caller treats 0 as "use the default")."""
    if not 1 <= value <= 65535:
        raise ConfigError(f"incorrect port number ({value})")
    return value


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


def parse_host_port(text: str) -> HostPort:
    """Parse ``IP:port`` / ``[IPv6]:port`` (host names rejected, port 1..65535)."""
    host, port = _split_host_port(text)
    if not host:
        raise ConfigError(f"empty host: {text}")
    address = _ip_or_none(host)
    if address is None:
        raise ConfigError(f"host is not an IP address: {text}")
    return HostPort(address, port)


def parse_dc_address(text: str) -> tuple[str, int]:
    """Parse a ``[dc-overrides]`` address: ``host:port``, host an IP literal or a host name."""
    host, port = _split_host_port(text)
    if not host:
        raise ConfigError(f"empty host: {text}")
    return _host_or_ip(host, text), port


def _split_host_port(text: str) -> tuple[str, int]:
    # Same rules as Go's net.SplitHostPort, then a decimal port 1..65535.
    colon = text.rfind(":")
    if colon < 0:
        raise ConfigError(f"missing port in address: {text}")
    host_start, host_end = 0, colon
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ConfigError(f"missing ']' in address: {text}")
        if close + 1 == len(text):
            raise ConfigError(f"missing port in address: {text}")
        if close + 1 != colon:
            if text[close + 1] == ":":
                raise ConfigError(f"too many colons in address: {text}")
            raise ConfigError(f"missing port in address: {text}")
        host_start, host_end = 1, close
    elif ":" in text[:colon]:
        raise ConfigError(f"too many colons in address: {text}")
    after_host = host_end + 1 if host_start else 0
    if "[" in text[host_start:] or "]" in text[after_host:]:
        raise ConfigError(f"unexpected bracket in address: {text}")
    return text[host_start:host_end], _port_from_text(text[colon + 1 :], text)


_PORT_RE = re.compile(r"[0-9]+")


def _port_from_text(port: str, context: str) -> int:
    # Decimal digits only (Go's ParseUint: no sign, no spaces); leading zeros are fine.
    significant = port.lstrip("0")
    if (
        not _PORT_RE.fullmatch(port)
        or len(significant) > 5
        or not 1 <= int(significant or "0") <= 65535
    ):
        raise ConfigError(f"incorrect port number ({context})")
    return int(significant)


_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _host_or_ip(host: str, context: str) -> str:
    """Return the canonical IP or the host name; a name must look like a DNS name."""
    address = _ip_or_none(host)
    if address is not None:
        return address
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if (
        not name
        or len(name) > 253
        or not all(_LABEL_RE.fullmatch(label) for label in labels)
        # An all-numeric last label is a mistyped IP, not a name (resolvers may read it as one).
        or labels[-1].isdigit()
    ):
        raise ConfigError(f"host is neither an IP address nor a valid host name: {context}")
    return host


def parse_prefer_ip(text: str) -> str:
    """Parse ``prefer-ip`` (case-insensitive): prefer-ipv4, prefer-ipv6, only-ipv4, only-ipv6."""
    value = text.lower()
    if value not in PREFER_IP_VALUES:
        raise ConfigError(f"unsupported ip preference: {value}")
    return value


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


# --- URLs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _URL:
    scheme: str  # lower-case, "" when absent
    authority: str | None  # None when there is no "//"
    username: str | None
    password: str | None
    host: str  # as written, brackets included for IPv6
    port: str | None  # None when absent (":" with nothing after it gives "")
    path: str
    rest: str  # query and fragment, with their "?" / "#"
    text: str  # the input with the scheme lower-cased

    @property
    def hostname(self) -> str:
        if self.host.startswith("[") and self.host.endswith("]"):
            return self.host[1:-1]
        return self.host


_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_USERINFO_RE = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:]|%[0-9A-Fa-f]{2})*")


def _redact_url(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:REDACTED@host`` (for messages)."""
    start = text.find("://")
    if start < 0:
        return text
    start += 3
    ends = (text.find(separator, start) for separator in "/?#")
    end = min((i for i in ends if i >= 0), default=len(text))
    at = text.rfind("@", start, end)
    colon = text.find(":", start, at) if at >= 0 else -1
    if colon < 0:
        return text
    return text[: colon + 1] + REDACTED + text[at:]


def _split_url(text: str, context: str) -> _URL:
    # A small subset of Go's url.Parse: enough to tell the forms mtg accepts apart.
    # `context` is the text to quote in error messages (password redacted).
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        raise ConfigError("invalid control character in URL")
    scheme = ""
    rest = text
    match = _SCHEME_RE.match(text)
    if match:
        scheme = match.group(1).lower()
        rest = text[match.end() :]
    elif text.startswith(":"):
        raise ConfigError(f"missing protocol scheme: {context}")
    query_at = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    before_query, tail = rest[:query_at], rest[query_at:]
    authority: str | None = None
    path = before_query
    if before_query.startswith("//"):
        slash = before_query.find("/", 2)
        slash = len(before_query) if slash < 0 else slash
        authority, path = before_query[2:slash], before_query[slash:]
    username = password = None
    host, port = "", None
    if authority is not None:
        hostport = authority
        at = authority.rfind("@")
        if at >= 0:
            userinfo, hostport = authority[:at], authority[at + 1 :]
            if not _USERINFO_RE.fullmatch(userinfo):
                raise ConfigError(f"invalid userinfo in URL: {context}")
            name, colon, secret = userinfo.partition(":")
            username = _unquote(name)
            password = _unquote(secret) if colon else None
        host, port = _split_url_host(hostport, context)
    return _URL(
        scheme=scheme,
        authority=authority,
        username=username,
        password=password,
        host=host,
        port=port,
        path=path,
        rest=tail,
        text=scheme + text[len(scheme) :] if scheme else text,
    )


def _split_url_host(hostport: str, context: str) -> tuple[str, str | None]:
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0:
            raise ConfigError(f"missing ']' in host: {context}")
        host, after = hostport[: close + 1], hostport[close + 1 :]
        if after and not after.startswith(":"):
            raise ConfigError(f"invalid port {after!r} after host: {context}")
        return host, after[1:] if after else None
    host, colon, port = hostport.rpartition(":")
    if not colon:
        return hostport, None
    return host, port


def _unquote(text: str) -> str:
    try:
        return urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ConfigError("invalid percent-encoding in userinfo (not UTF-8)") from None


def _url_host(url: _URL, context: str) -> str:
    """Validated host of a URL: canonical IP (IPv6 only in brackets) or a host name."""
    if url.host.startswith("["):
        address = _ip_or_none(url.hostname)
        if address is None or ":" not in url.hostname:
            raise ConfigError(f"incorrect IPv6 address in brackets: {context}")
        return address
    return _host_or_ip(url.host, context)


def _url_port(url: _URL, default: int | None, context: str) -> int | None:
    if url.port is None:
        return default
    return _port_from_text(url.port, context)


def parse_dns(text: str) -> str:
    """Parse ``network.dns`` and return it normalised.

    Forms: ``https://host[:port][/path]`` (DoH), ``tls://host[:port]`` (DoT),
    ``udp://IP[:port]`` or a bare IP (plain DNS; returned as ``udp://IP``). No user info;
    a path only for DoH. Raises ConfigError.
    """
    bracketed = text.startswith("[") and text.endswith("]")
    bare = _ip_or_none(text[1:-1] if bracketed else text)
    if bare is not None and (":" in bare or not bracketed):
        return "udp://" + bracket_host(bare)
    shown = _redact_url(text)
    url = _split_url(text, shown)
    if url.authority is None or not url.host:
        raise ConfigError(
            f"unsupported DNS address {shown}: expected https://, tls://, udp:// or IP"
        )
    if url.scheme not in ("https", "tls", "udp"):
        raise ConfigError(f"unsupported DNS type {url.scheme or '(none)'}: {shown}")
    if url.username is not None:
        raise ConfigError(f"user info is not supported: {shown}")
    if url.scheme != "https" and url.path:
        raise ConfigError(f"path is supported only for DoH: {shown}")
    host = _url_host(url, shown)
    _url_port(url, None, shown)
    if url.scheme == "udp" and _ip_or_none(host) is None:
        raise ConfigError(f"simple DNS must be an IP address: {url.host}")
    return url.text


def parse_proxy_url(text: str) -> ProxyURL:
    """Parse a SOCKS5 proxy URL ``socks5[h]://[user[:password]@]host[:port]`` (port 1080).

    Path, query and fragment are accepted and ignored (mtg: circuit-breaker parameters of an
    old release). Raises ConfigError.
    """
    shown = _redact_url(text)
    url = _split_url(text, shown)
    if url.authority is None or not url.host:
        raise ConfigError(f"url has to have a scheme and a host: {shown}")
    if url.scheme not in ("socks5", "socks5h"):
        raise ConfigError(f"unsupported schema: {url.scheme}")
    host = _url_host(url, shown)
    port = _url_port(url, 1080, shown)
    assert port is not None
    return ProxyURL(url.scheme, host, port, url.username, url.password)


def parse_https_url(text: str) -> str:
    """Parse a doppelganger URL: ``https://`` with a host. Returns it scheme-normalised."""
    shown = _redact_url(text)
    url = _split_url(text, shown)
    if url.authority is None or not url.host:
        raise ConfigError(f"url has to have a scheme and a host: {shown}")
    if url.scheme != "https":
        raise ConfigError(f"unsupported schema: {url.scheme}")
    _url_host(url, shown)
    _url_port(url, None, shown)
    return url.text


def parse_list_url(text: str, base_dir: str | None = None) -> str:
    """Parse an IP-list source: an existing readable regular file or an http(s) URL with host.

    A relative path is resolved against ``base_dir`` (default: the working directory) and
    returned absolute. URLs are returned scheme-normalised. Raises ConfigError.
    """
    path = os.path.join(base_dir, text) if base_dir and text else text
    try:
        info = os.stat(path) if text else None
    except (OSError, ValueError):  # ValueError: embedded NUL
        info = None
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"value is a path to a directory: {path}")
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"value is a path but not a regular file: {path}")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"value is a path to a file that is not readable: {path}")
        return os.path.abspath(path)
    shown = _redact_url(text)
    url = _split_url(text, shown)
    if url.scheme not in ("http", "https"):
        raise ConfigError(
            f"neither an existing file nor an http(s) URL: {shown}"
            + (f" (unknown schema {url.scheme})" if url.scheme else "")
        )
    if url.authority is None or not url.host:
        raise ConfigError(f"incorrect url {shown}: no host")
    _url_host(url, shown)
    _url_port(url, None, shown)
    return url.text


def parse_ntp_server(text: str) -> tuple[str, int]:
    """Parse a ``[doctor] ntp-servers`` entry: ``host``, ``host:port`` or ``[v6]:port``.

    The host is an IP literal or a host name; the port defaults to 123. Returns
    ``(host, port)``. Raises ConfigError.
    """
    bracketed = text.startswith("[") and text.endswith("]")
    bare = _ip_or_none(text[1:-1] if bracketed else text)
    if bare is not None:
        return bare, NTP_PORT
    if text.startswith("[") or ":" in text:
        host, port = _split_host_port(text)
    else:
        host, port = text, NTP_PORT
    if not host:
        raise ConfigError(f"empty host: {text}")
    return _host_or_ip(host, text), port


def format_ntp_server(server: tuple[str, int]) -> str:
    """``("time.example", 123)`` -> ``"time.example"``; other ports as ``host:port``."""
    host, port = server
    if port == NTP_PORT:
        return host
    return join_host_port(host, port)


def parse_echo_url(text: str) -> str:
    """Parse an IP echo service URL (``[doctor] ip-echo-urls``): http(s) with a host."""
    shown = _redact_url(text)
    url = _split_url(text, shown)
    if url.scheme not in ("http", "https"):
        raise ConfigError(f"unsupported schema: {url.scheme or '(none)'}: {shown}")
    if url.authority is None or not url.host:
        raise ConfigError(f"url has to have a scheme and a host: {shown}")
    _url_host(url, shown)
    _url_port(url, None, shown)
    return url.text


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


# ---------------------------------------------------------------------------------------------
# Reading the TOML document

_T = TypeVar("_T")


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, (list, tuple)):
        return "array"
    return type(value).__name__  # datetime, date, time


class _Section:
    """One TOML table; remembers which keys were read so the rest can be reported."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        self._data = data
        self._path = path
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def fail(self, name: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.key(name)}: {reason}")

    def _raw(self, name: str, expected: str, check: Callable[[object], bool]) -> Any:
        self._seen.add(name)
        if name not in self._data:
            return None
        value = self._data[name]
        if not check(value):
            raise self.fail(name, f"expected {expected}, got {_toml_type(value)}")
        return value

    def section(self, name: str) -> _Section:
        value = self._raw(name, "a table", lambda v: isinstance(v, Mapping))
        return _Section(value if value is not None else {}, self.key(name))

    def flag(self, name: str) -> bool:
        return bool(self._raw(name, "a boolean", lambda v: isinstance(v, bool)))

    def text(self, name: str) -> str | None:
        """A string; absent and ``""`` both give None (mtg's zero value = absent)."""
        return self._raw(name, "a string", lambda v: isinstance(v, str)) or None

    def string(self, name: str, parser: Callable[[str], _T], default: _T) -> _T:
        value = self.text(name)
        if value is None:
            return default
        return self.convert(name, parser, value)

    def integer(self, name: str, parser: Callable[[int], int], default: int) -> int:
        value = self._raw(name, "an integer", _is_int)
        if not value:
            return default
        if value < 0:  # mtg decodes these keys into unsigned integers
            raise self.fail(name, f"negative number {value} is not allowed")
        return self.convert(name, parser, value)

    def number(self, name: str, parser: Callable[[float], float], default: float) -> float:
        value = self._raw(name, "a number", lambda v: _is_int(v) or isinstance(v, float))
        if not value:
            return default
        return self.convert(name, parser, float(value))

    def duration(self, name: str, default: float) -> float:
        return self.optional_duration(name) or default

    def optional_duration(self, name: str) -> float | None:
        return self.string(name, parse_duration, 0.0) or None

    def strings(self, name: str, parser: Callable[[str], _T]) -> tuple[_T, ...]:
        values = self._raw(name, "an array of strings", lambda v: isinstance(v, (list, tuple)))
        result = []
        for index, value in enumerate(values or ()):
            item = f"{name}[{index}]"
            if not isinstance(value, str):
                raise self.fail(item, f"expected a string, got {_toml_type(value)}")
            result.append(self.convert(item, parser, value))
        return tuple(result)

    def convert(self, name: str, parser: Callable[[Any], _T], value: Any) -> _T:
        try:
            return parser(value)
        except ConfigError as exc:
            raise self.fail(name, str(exc)) from None

    def names(self) -> list[str]:
        return list(self._data)

    def finish(self) -> None:
        for name in self._data:
            if name not in self._seen:
                raise self.fail(name, "unknown key")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


UNTRUSTED_PROXY_HEADERS = (
    "proxy-protocol-listener is on and proxy-protocol-trusted is not set: any client can "
    "send a PROXY header and claim any address, which gets it past the blocklist and "
    "allowlist and puts that address in the logs and metrics; list the addresses of your "
    "load balancers in proxy-protocol-trusted"
)


def warnings(config: Config) -> list[str]:
    """Valid settings that an operator should hear about when they take effect."""
    found = []
    if config.proxy_protocol_listener and config.proxy_protocol_trusted is None:
        found.append(UNTRUSTED_PROXY_HEADERS)
    return found


def load(path: str | os.PathLike[str]) -> Config:
    """Read and parse a TOML config file.

    Relative list-file paths are resolved against the file's directory. Raises ConfigError
    (unreadable file, TOML syntax error, invalid value).
    """
    try:
        with open(path, "rb") as stream:
            data = tomllib.load(stream)
    except OSError as exc:
        raise ConfigError(f"cannot read config {os.fspath(path)}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cannot parse toml config {os.fspath(path)}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot parse toml config {os.fspath(path)}: {exc}") from None
    return parse(data, base_dir=os.path.dirname(os.path.abspath(path)))


def parse(data: Mapping[str, Any], *, base_dir: str | None = None) -> Config:
    """Build a Config from decoded TOML data (mtg v2 keys plus ``[dc-overrides]``).

    ``base_dir`` resolves relative list-file paths (None: the working directory).
    Raises ConfigError naming the first offending dotted key.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a table, got {_toml_type(data)}")
    root = _Section(data, "")
    deprecated: list[str] = []

    raw_secret = root.text("secret")
    if raw_secret is None:
        raise root.fail("secret", "secret is empty")
    try:
        secret = Secret.parse(raw_secret)
    except SecretError as exc:
        # Error texts may quote their input; the secret is the proxy's password.
        raise root.fail("secret", str(exc).replace(raw_secret, REDACTED)) from None
    if not secret.is_valid():
        # mtg prints the secret here; we never do (it is the proxy's password).
        raise root.fail("secret", "invalid secret: the key is all zeros or the host is empty")

    bind_to = root.string("bind-to", parse_host_port, None)
    if bind_to is None:
        raise root.fail("bind-to", "bind-to is required (host:port, e.g. 0.0.0.0:443)")

    old_fronting_port = root.integer("domain-fronting-port", parse_port, 0)
    old_fronting_ip = root.string("domain-fronting-ip", parse_ip, None)
    old_fronting_proxy_protocol = root.flag("domain-fronting-proxy-protocol")
    if old_fronting_ip is not None:
        deprecated.append("domain-fronting-ip")
    if old_fronting_port:
        deprecated.append("domain-fronting-port")
    if old_fronting_proxy_protocol:
        deprecated.append("domain-fronting-proxy-protocol")

    fronting_section = root.section("domain-fronting")
    domain_fronting = DomainFronting(
        host=fronting_section.string("ip", parse_ip, None) or old_fronting_ip,
        port=fronting_section.integer("port", parse_port, 0) or old_fronting_port or 443,
        proxy_protocol=fronting_section.flag("proxy-protocol") or old_fronting_proxy_protocol,
    )
    fronting_section.finish()

    network, doh_ip_set = _parse_network(root.section("network"))
    if doh_ip_set:
        deprecated.append("network.doh-ip")

    config = Config(
        secret=secret,
        bind_to=bind_to,
        debug=root.flag("debug"),
        proxy_protocol_listener=root.flag("proxy-protocol-listener"),
        proxy_protocol_trusted=root.strings("proxy-protocol-trusted", parse_cidr)
        if "proxy-protocol-trusted" in root.names()
        else None,
        concurrency=root.integer("concurrency", parse_concurrency, 4096),
        prefer_ip=root.string("prefer-ip", parse_prefer_ip, "prefer-ipv6"),
        public_ipv4=root.string("public-ipv4", parse_ip, None),
        public_ipv6=root.string("public-ipv6", parse_ip, None),
        auto_update=root.flag("auto-update"),
        tolerate_time_skewness=root.duration("tolerate-time-skewness", 3.0),
        allow_fallback_on_unknown_dc=root.flag("allow-fallback-on-unknown-dc"),
        domain_fronting=domain_fronting,
        network=network,
        defense=_parse_defense(root.section("defense"), base_dir),
        stats=_parse_stats(root.section("stats")),
        supervisor=_parse_supervisor(root.section("supervisor"), base_dir),
        doctor=_parse_doctor(root.section("doctor"), base_dir),
        dc_overrides=_parse_dc_overrides(root.section("dc-overrides")),
        deprecated=tuple(deprecated),
    )
    root.finish()
    return config


def _parse_network(section: _Section) -> tuple[Network, bool]:
    doh_ip = section.string("doh-ip", parse_ip, None)
    dns = section.string("dns", parse_dns, None)
    if dns is None and doh_ip is not None:
        dns = "https://" + bracket_host(doh_ip)

    timeout_section = section.section("timeout")
    timeout = Timeouts(
        tcp=timeout_section.optional_duration("tcp"),
        http=timeout_section.optional_duration("http"),
        idle=timeout_section.duration("idle", 300.0),
        handshake=timeout_section.duration("handshake", 10.0),
    )
    timeout_section.finish()

    keep_alive_section = section.section("keep-alive")
    keep_alive = KeepAlive(
        disabled=keep_alive_section.flag("disabled"),
        idle=keep_alive_section.duration("idle", 15.0),
        interval=keep_alive_section.duration("interval", 15.0),
        count=keep_alive_section.integer("count", parse_concurrency, 9),
    )
    keep_alive_section.finish()

    network = Network(
        dns=dns,
        proxies=section.strings("proxies", parse_proxy_url),
        timeout=timeout,
        keep_alive=keep_alive,
    )
    section.finish()
    return network, doh_ip is not None


def _parse_defense(section: _Section, base_dir: str | None) -> Defense:
    anti_replay_section = section.section("anti-replay")
    anti_replay = AntiReplay(
        enabled=anti_replay_section.flag("enabled"),
        max_size=anti_replay_section.string("max-size", parse_bytes, 0) or 1024 * 1024,
        error_rate=_error_rate_or_default(
            anti_replay_section.number("error-rate", parse_error_rate, 0.0), 0.001
        ),
    )
    anti_replay_section.finish()

    doppelganger_section = section.section("doppelganger")
    doppelganger = Doppelganger(
        urls=doppelganger_section.strings("urls", parse_https_url),
        repeats_per_raid=doppelganger_section.integer("repeats-per-raid", parse_concurrency, 10),
        raid_each=doppelganger_section.duration("raid-each", 6 * 3600.0),
        drs=doppelganger_section.flag("drs"),
    )
    doppelganger_section.finish()

    defense = Defense(
        anti_replay=anti_replay,
        blocklist=_parse_ip_list(section.section("blocklist"), base_dir),
        allowlist=_parse_ip_list(section.section("allowlist"), base_dir),
        doppelganger=doppelganger,
    )
    section.finish()
    return defense


def _error_rate_or_default(value: float, default: float) -> float:
    # mtg: rates below 1e-8 are accepted but mean "use the default".
    return default if value < 1e-8 else value


def _parse_ip_list(section: _Section, base_dir: str | None) -> IPListConfig:
    result = IPListConfig(
        enabled=section.flag("enabled"),
        download_concurrency=section.integer("download-concurrency", parse_concurrency, 1),
        urls=section.strings("urls", lambda text: parse_list_url(text, base_dir)),
        update_each=section.duration("update-each", 6 * 3600.0),
    )
    section.finish()
    return result


def _parse_stats(section: _Section) -> Stats:
    statsd_section = section.section("statsd")
    statsd = Statsd(
        enabled=statsd_section.flag("enabled"),
        address=statsd_section.string("address", parse_host_port, None),
        metric_prefix=statsd_section.string("metric-prefix", parse_metric_prefix, "mtg."),
        tag_format=statsd_section.string("tag-format", parse_tag_format, "datadog"),
    )
    statsd_section.finish()
    if statsd.enabled and statsd.address is None:
        raise ConfigError("stats.statsd.address: statsd is enabled but has no address to send to")

    prometheus_section = section.section("prometheus")
    prometheus = Prometheus(
        enabled=prometheus_section.flag("enabled"),
        bind_to=prometheus_section.string("bind-to", parse_host_port, None),
        http_path=prometheus_section.string("http-path", parse_http_path, "/"),
        metric_prefix=prometheus_section.string("metric-prefix", parse_metric_prefix, "mtg"),
    )
    prometheus_section.finish()

    section.finish()
    return Stats(statsd=statsd, prometheus=prometheus)


def _parse_supervisor(section: _Section, base_dir: str | None) -> Supervisor:
    result = Supervisor(
        workers=section.integer("workers", parse_workers, 0),
        graceful_timeout=section.duration("graceful-timeout", 30.0),
        worker_max_rss=section.string("worker-max-rss", parse_bytes, 0) or None,
        pid_file=section.string("pid-file", lambda text: parse_pid_file(text, base_dir), None),
    )
    section.finish()
    return result


def _parse_doctor(section: _Section, base_dir: str | None) -> Doctor:
    ntp_servers = section.strings("ntp-servers", parse_ntp_server)
    result = Doctor(
        ntp_servers=ntp_servers or Doctor.ntp_servers,
        ip_echo_urls=section.strings("ip-echo-urls", parse_echo_url),
        ca_file=section.string("ca-file", lambda text: parse_ca_file(text, base_dir), None),
        timeout=section.duration("timeout", 5.0),
    )
    section.finish()
    return result


def _parse_dc_overrides(section: _Section) -> Mapping[int, tuple[tuple[str, int], ...]]:
    overrides: dict[int, tuple[tuple[str, int], ...]] = {}
    for name in section.names():
        dc = section.convert(name, parse_dc_number, name)
        addresses = section.strings(name, parse_dc_address)
        if not addresses:
            raise section.fail(name, "expected a non-empty array of host:port strings")
        overrides[dc] = addresses
    section.finish()
    return types.MappingProxyType(overrides)
