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

The package re-exports its public API here (``from mtgworkers.config import Config, parse``);
the parts live in:

- :mod:`~mtgworkers.config.model`: the dataclasses (:class:`Config`, :class:`Network`, ...),
  ``Config.to_json_dict()`` and :func:`warnings`;
- the value kinds, one small parser (and type, where text is not enough) each, the
  counterparts of mtg's ``internal/config/type_*.go``; they raise :class:`ConfigError` with
  the reason only:

  - :mod:`~mtgworkers.config.units`: durations and byte sizes (parse and format);
  - :mod:`~mtgworkers.config.addresses`: IPs, ports, :class:`HostPort`, CIDR networks,
    ``[dc-overrides]`` addresses, NTP servers;
  - :mod:`~mtgworkers.config.urls`: :class:`DnsServer` (``network.dns``),
    :class:`ProxyURL`, doppelganger, IP-list and IP echo URLs;
  - :mod:`~mtgworkers.config.scalars`: :class:`PreferIP`, tag format, metric prefix, HTTP
    path, bounded integers, error rate, pid and CA files, DC numbers;

- :mod:`~mtgworkers.config.loader`: the TOML walker, :func:`parse`, :func:`read`,
  :func:`loads` and :func:`load`, which prefix a value's reason with the full dotted key, e.g.
  ``network.timeout.idle: duration has to be a positive: -1s``;
- :mod:`~mtgworkers.config.deprecations`: the deprecated keys and their warning text;
- :mod:`~mtgworkers.config.errors`: :class:`ConfigError` and ``REDACTED``.

``host:port`` text is written by :func:`mtgworkers.netaddr.join_host_port`.
"""

from __future__ import annotations

from mtgworkers.config.addresses import (
    NTP_PORT,
    HostPort,
    format_ntp_server,
    parse_cidr,
    parse_dc_address,
    parse_host_port,
    parse_ip,
    parse_ntp_server,
    parse_port,
)
from mtgworkers.config.deprecations import (
    DEPRECATED,
    DEPRECATED_KEYS,
    DeprecatedKey,
    deprecation_message,
)
from mtgworkers.config.errors import REDACTED, ConfigError
from mtgworkers.config.loader import load, loads, parse, read
from mtgworkers.config.model import (
    DEFAULT_NTP_SERVERS,
    UNTRUSTED_PROXY_HEADERS,
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
    warnings,
)
from mtgworkers.config.scalars import (
    MAX_WORKERS,
    PREFER_IP_VALUES,
    TAG_FORMATS,
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
from mtgworkers.config.units import format_bytes, format_duration, parse_bytes, parse_duration
from mtgworkers.config.urls import (
    DnsServer,
    ProxyURL,
    parse_dns,
    parse_echo_url,
    parse_https_url,
    parse_list_url,
    parse_proxy_url,
)

__all__ = [
    "DEFAULT_NTP_SERVERS",
    "DEPRECATED",
    "DEPRECATED_KEYS",
    "MAX_WORKERS",
    "NTP_PORT",
    "PREFER_IP_VALUES",
    "REDACTED",
    "TAG_FORMATS",
    "UNTRUSTED_PROXY_HEADERS",
    "AntiReplay",
    "Config",
    "ConfigError",
    "Defense",
    "DeprecatedKey",
    "DnsServer",
    "Doctor",
    "DomainFronting",
    "Doppelganger",
    "HostPort",
    "IPListConfig",
    "KeepAlive",
    "Network",
    "PreferIP",
    "Prometheus",
    "ProxyURL",
    "Stats",
    "Statsd",
    "Supervisor",
    "Timeouts",
    "deprecation_message",
    "format_bytes",
    "format_duration",
    "format_ntp_server",
    "load",
    "loads",
    "parse",
    "parse_bytes",
    "parse_ca_file",
    "parse_cidr",
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
    "read",
    "warnings",
]
