"""Reading the TOML document: the :class:`_Section` walker, :func:`parse` and :func:`load`.

``_Section`` wraps one TOML table: it reads a key with the TOML type it expects, treats a
zero value (``false``, ``0``, ``""``) as absent like mtg, hands the text or number to the
value's parser (:mod:`~mtgworkers.config.units`, :mod:`~mtgworkers.config.addresses`,
:mod:`~mtgworkers.config.urls`, :mod:`~mtgworkers.config.scalars`), prefixes the parser's
reason with the full dotted key (``network.timeout.idle: duration has to be a positive:
-1s``) and reports the keys nobody read as unknown.

:func:`parse` builds a :class:`~mtgworkers.config.model.Config` from decoded TOML data,
table by table, and notes the deprecated keys that are set
(:mod:`~mtgworkers.config.deprecations`); :func:`load` reads and decodes the file first.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from mtgworkers.config.addresses import (
    parse_cidr,
    parse_dc_address,
    parse_host_port,
    parse_ip,
    parse_ntp_server,
    parse_port,
)
from mtgworkers.config.deprecations import DEPRECATED_KEYS
from mtgworkers.config.errors import REDACTED, ConfigError
from mtgworkers.config.model import (
    AntiReplay,
    Config,
    Defense,
    Doctor,
    DomainFronting,
    Doppelganger,
    IPListConfig,
    KeepAlive,
    Network,
    Prometheus,
    Stats,
    Statsd,
    Supervisor,
    Timeouts,
)
from mtgworkers.config.scalars import (
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
from mtgworkers.config.units import format_duration, parse_bytes, parse_duration
from mtgworkers.config.urls import (
    parse_dns,
    parse_echo_url,
    parse_https_url,
    parse_list_url,
    parse_proxy_url,
)
from mtgworkers.netaddr import bracket_host
from mtgworkers.protocol.secret import Secret, SecretError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["load", "loads", "parse"]

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

    def flag(self, name: str, default: bool = False) -> bool:
        value = self._raw(name, "a boolean", lambda v: isinstance(v, bool))
        return default if value is None else bool(value)

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


def load(path: str | os.PathLike[str]) -> Config:
    """Read and parse a TOML config file.

    Relative list-file paths are resolved against the file's directory. Raises ConfigError
    (unreadable file, TOML syntax error, invalid value).
    """
    data, base_dir = read(path)
    return parse(data, base_dir=base_dir)


def read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """Decode a TOML config file without validating it: ``(data, base_dir)`` for
    :func:`parse` (the supervisor hands both to its workers, which parse them with their
    own code). Raises ConfigError (unreadable file, not UTF-8, TOML syntax error, nesting
    deeper than the decoder follows)."""
    try:
        with open(path, "rb") as stream:
            raw = stream.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config {os.fspath(path)}: {exc.strerror or exc}") from None
    return _decode(raw, os.fspath(path)), os.path.dirname(os.path.abspath(path))


def loads(raw: bytes | str, *, source: str = "<string>", base_dir: str | None = None) -> Config:
    """Decode and parse the text of a TOML config file (UTF-8 when given as bytes).

    ``source`` names the text in error messages; ``base_dir`` is :func:`parse`'s. Raises
    ConfigError, and nothing else, whatever the bytes: a syntax error, text that is not
    UTF-8, arrays or tables nested deeper than the decoder can follow, an integer of more
    digits than Python converts, an invalid value.
    """
    return parse(_decode(raw, source), base_dir=base_dir)


def _decode(raw: bytes | str, source: str) -> dict[str, Any]:
    """The TOML data of ``raw``; ConfigError for anything the decoder cannot read."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return tomllib.loads(text)
    except RecursionError:
        raise ConfigError(
            f"cannot parse toml config {source}: arrays or tables are nested too deeply"
        ) from None
    except ValueError as exc:  # TOMLDecodeError, UnicodeDecodeError, int() digit limit
        raise ConfigError(f"cannot parse toml config {source}: {exc}") from None


def parse(data: Mapping[str, Any], *, base_dir: str | None = None) -> Config:
    """Build a Config from decoded TOML data (mtg v2 keys plus ``[dc-overrides]``).

    ``base_dir`` resolves relative list-file paths (None: the working directory).
    Raises ConfigError naming the first offending dotted key.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a table, got {_toml_type(data)}")
    root = _Section(data, "")
    deprecated: set[str] = set()  # the keys of DEPRECATED_KEYS that are set

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
        deprecated.add("domain-fronting-ip")
    if old_fronting_port:
        deprecated.add("domain-fronting-port")
    if old_fronting_proxy_protocol:
        deprecated.add("domain-fronting-proxy-protocol")

    fronting_section = root.section("domain-fronting")
    domain_fronting = DomainFronting(
        host=fronting_section.string("ip", parse_ip, None) or old_fronting_ip,
        port=fronting_section.integer("port", parse_port, 0) or old_fronting_port or 443,
        proxy_protocol=fronting_section.flag("proxy-protocol") or old_fronting_proxy_protocol,
    )
    fronting_section.finish()

    network, doh_ip_set = _parse_network(root.section("network"))
    if doh_ip_set:
        deprecated.add("network.doh-ip")

    config = Config(
        secret=secret,
        bind_to=bind_to,
        debug=root.flag("debug"),
        proxy_protocol_listener=root.flag("proxy-protocol-listener"),
        proxy_protocol_trusted=root.strings("proxy-protocol-trusted", parse_cidr)
        if "proxy-protocol-trusted" in root.names()
        else None,
        concurrency=root.integer("concurrency", parse_concurrency, 4096),
        prefer_ip=root.string("prefer-ip", parse_prefer_ip, PreferIP.PREFER_IPV6),
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
        deprecated=_in_table_order(deprecated),
    )
    root.finish()
    return config


def _parse_network(section: _Section) -> tuple[Network, bool]:
    doh_ip = section.string("doh-ip", parse_ip, None)
    dns = section.string("dns", parse_dns, None)
    if dns is None and doh_ip is not None:
        dns = parse_dns("https://" + bracket_host(doh_ip))

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
        pacing=doppelganger_section.flag("pacing", default=True),
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
        worker_timeout=section.duration("worker-timeout", 30.0),
    )
    if result.worker_timeout < 1.0:  # workers beat twice a second, checked once a second
        raise section.fail(
            "worker-timeout", f"has to be at least 1s ({format_duration(result.worker_timeout)})"
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


def _in_table_order(keys: set[str]) -> tuple[str, ...]:
    unknown = keys.difference(DEPRECATED_KEYS)
    assert not unknown, f"deprecated keys missing from DEPRECATED_KEYS: {sorted(unknown)}"
    return tuple(key for key in DEPRECATED_KEYS if key in keys)
