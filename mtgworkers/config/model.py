"""The parsed configuration: frozen dataclasses, one per TOML table, and their JSON dump.

:class:`Config` is the whole file with defaults applied (mtg's code defaults); its fields
hold typed values (:class:`~mtgworkers.config.addresses.HostPort`,
:class:`~mtgworkers.config.urls.DnsServer`, :class:`~mtgworkers.config.scalars.PreferIP`,
seconds as floats, sizes as ints), so no consumer parses text again.
:meth:`Config.to_json_dict` gives it back shaped like the file, secrets redacted.
:func:`warnings` lists valid settings an operator should hear about.

Nothing here reads TOML: :mod:`mtgworkers.config.loader` builds these objects.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mtgworkers.config.addresses import NTP_PORT, HostPort, format_ntp_server
from mtgworkers.config.errors import REDACTED
from mtgworkers.config.scalars import PreferIP
from mtgworkers.config.units import format_bytes, format_duration
from mtgworkers.config.urls import DnsServer, ProxyURL, _redact_url
from mtgworkers.defense.iplist import Network as IPNetwork
from mtgworkers.netaddr import join_host_port
from mtgworkers.protocol.secret import Secret

__all__ = [
    "DEFAULT_NTP_SERVERS",
    "UNTRUSTED_PROXY_HEADERS",
    "AntiReplay",
    "Config",
    "Defense",
    "Doctor",
    "DomainFronting",
    "Doppelganger",
    "IPListConfig",
    "KeepAlive",
    "Network",
    "Prometheus",
    "Stats",
    "Statsd",
    "Supervisor",
    "Timeouts",
    "warnings",
]

# [doctor] defaults: public NTP pools/services; the IP echo services are those of
# mtgworkers.publicip (kept there so `access` and `run` use the same list).
DEFAULT_NTP_SERVERS = ("0.pool.ntp.org", "1.pool.ntp.org", "time.google.com", "time.cloudflare.com")


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
    dns: DnsServer | None = None  # None: the system resolver
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
    pacing: bool = True  # EXTENSION: mtg always paces


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
    worker_timeout: float = 30.0  # a worker whose event loop is stuck this long is replaced


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
    prefer_ip: PreferIP = PreferIP.PREFER_IPV6
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
    # Deprecated keys that were set (non-zero), spelled as in deprecations.DEPRECATED_KEYS.
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
            "prefer-ip": str(self.prefer_ip),
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
                "dns": _format_optional(self.network.dns),
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
                    "pacing": defense.doppelganger.pacing,
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
                "worker-timeout": format_duration(self.supervisor.worker_timeout),
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
