"""mtgworkers.netaddr: the one host:port formatter."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtgworkers.config import parse_dc_address, parse_host_port
from mtgworkers.netaddr import bracket_host, join_host_port


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("192.0.2.1", 443, "192.0.2.1:443"),
        ("2001:db8::1", 443, "[2001:db8::1]:443"),
        ("::", 0, "[::]:0"),
        ("dc.example", 8443, "dc.example:8443"),
        ("localhost", 1, "localhost:1"),
    ],
)
def test_join_host_port(host: str, port: int, text: str) -> None:
    assert join_host_port(host, port) == text


@pytest.mark.parametrize(
    ("host", "text"),
    [("192.0.2.1", "192.0.2.1"), ("::1", "[::1]"), ("dns.example", "dns.example")],
)
def test_bracket_host(host: str, text: str) -> None:
    assert bracket_host(host) == text


@given(host=st.ip_addresses(), port=st.integers(min_value=1, max_value=65535))
def test_the_config_parses_what_it_writes(
    host: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    text = join_host_port(str(host), port)
    assert parse_host_port(text).port == port
    assert ipaddress.ip_address(parse_dc_address(text)[0]) in (
        host,
        getattr(host, "ipv4_mapped", None),
    )
