"""Shared by the config tests: secrets, minimal documents, mtg's example config and
strategies for fuzzing."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import strategies as st

from mtgworkers.config import ConfigError, parse

REPO = pathlib.Path(__file__).resolve().parents[3]

# docs/mtg-compat.md a.4 (hex) and mtg's internal/config/testdata/minimal.toml (base64).
SECRET_HEX = "ee473ce5d4958eb5f968c87680a23854a0676f6f676c652e636f6d"
SECRET_B64 = "7oe1GqLy6TBc38CV3jx7q09nb29nbGUuY29t"
FIREHOL = "https://iplists.firehol.org/files/firehol_level1.netset"


def minimal(**extra: Any) -> dict[str, Any]:
    return {"secret": SECRET_HEX, "bind-to": "0.0.0.0:443", **extra}


def error_of(data: dict[str, Any], base_dir: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data, base_dir=base_dir)
    return str(info.value)


def with_key(dotted: str, value: Any) -> dict[str, Any]:
    """A minimal config with one (possibly nested) key set."""
    data = minimal()
    *tables, last = dotted.split(".")
    node = data
    for name in tables:
        node = node.setdefault(name, {})
    node[last] = value
    return data


# Every key of docs/mtg-compat.md a.3 set: the "example" column where it has a value, otherwise
# mtg's commented-out example values (or a plausible value for keys the example lacks).
MTG_EXAMPLE_TOML = f"""
debug = true
secret = "ee367a189aee18fa31c190054efd4a8e9573746f726167652e676f6f676c65617069732e636f6d"
bind-to = "0.0.0.0:3128"
proxy-protocol-listener = true
concurrency = 8192
prefer-ip = "prefer-ipv6"
public-ipv4 = "203.0.113.1"
public-ipv6 = "2001:db8::1"
auto-update = true
domain-fronting-port = 443
domain-fronting-ip = "10.0.0.10"
domain-fronting-proxy-protocol = true
tolerate-time-skewness = "5s"
allow-fallback-on-unknown-dc = true

[domain-fronting]
ip = "10.10.10.11"
port = 8443
proxy-protocol = false

[network]
doh-ip = "1.1.1.1"
dns = "https://1.1.1.1"
proxies = ["socks5://user:password@127.0.0.1:1080", "socks5h://proxy.example"]

[network.timeout]
tcp = "5s"
http = "10s"
idle = "5m"
handshake = "10s"

[network.keep-alive]
disabled = true
idle = "15s"
interval = "15s"
count = 9

[defense.doppelganger]
urls = ["https://www.example.com/"]
repeats-per-raid = 10
raid-each = "6h"
drs = true

[defense.anti-replay]
enabled = true
max-size = "1mib"
error-rate = 0.001

[defense.blocklist]
enabled = true
download-concurrency = 2
urls = [
    "{FIREHOL}",
]
update-each = "24h"

[defense.allowlist]
enabled = false
download-concurrency = 2
urls = [
]
update-each = "24h"

[stats.statsd]
enabled = true
address = "127.0.0.1:8888"
metric-prefix = "mtg"
tag-format = "datadog"

[stats.prometheus]
enabled = true
bind-to = "127.0.0.1:3129"
http-path = "/"
metric-prefix = "mtg"
"""


URLISH = st.builds(
    str.__add__,
    st.sampled_from(["", "socks5://", "https://", "http://", "udp://", "tls://", "["]),
    st.text(alphabet="ab1:/.@[]%?#-_ 0e5smhkKiIB\u00b5\t\n", max_size=40),
)
# Text for the fuzz tests of the value parsers: anything, and things that look like URLs.
HOSTILE_TEXT = st.one_of(st.text(max_size=40), URLISH)


def raises_only_config_error(parser: Callable[[Any], object], value: Any) -> None:
    """Call ``parser(value)``: a ConfigError is fine, any other exception fails the test."""
    try:
        parser(value)
    except ConfigError:
        pass
