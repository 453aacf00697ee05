"""IPs, ports, host:port, CIDR networks, [dc-overrides] addresses and NTP servers
(mtgworkers.config.addresses)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtgworkers.config import (
    NTP_PORT,
    ConfigError,
    HostPort,
    format_ntp_server,
    parse_cidr,
    parse_dc_address,
    parse_host_port,
    parse_ip,
    parse_ntp_server,
    parse_port,
)
from tests.unit.config.helpers import HOSTILE_TEXT, raises_only_config_error

# ---------------------------------------------------------------------------------------------
# host:port (TypeHostPort), port (TypePort), IP (TypeIP)


@pytest.mark.parametrize(
    ("text", "host", "port", "printed"),
    [
        # mtg's type_hostport_test.go
        ("127.0.0.1:80", "127.0.0.1", 80, "127.0.0.1:80"),
        ("10.0.0.10:6553", "10.0.0.10", 6553, "10.0.0.10:6553"),
        ("0.0.0.0:443", "0.0.0.0", 443, "0.0.0.0:443"),
        ("[::]:443", "::", 443, "[::]:443"),
        ("[::1]:3129", "::1", 3129, "[::1]:3129"),
        ("[2001:DB8:0::1]:65535", "2001:db8::1", 65535, "[2001:db8::1]:65535"),
        ("[1.2.3.4]:80", "1.2.3.4", 80, "1.2.3.4:80"),  # Go's SplitHostPort allows this
        ("[::ffff:1.2.3.4]:80", "1.2.3.4", 80, "1.2.3.4:80"),
        ("127.0.0.1:0443", "127.0.0.1", 443, "127.0.0.1:443"),
        ("127.0.0.1:" + "0" * 5000 + "80", "127.0.0.1", 80, "127.0.0.1:80"),
    ],
)
def test_parse_host_port_ok(text: str, host: str, port: int, printed: str) -> None:
    parsed = parse_host_port(text)
    assert parsed == HostPort(host, port)
    assert str(parsed) == printed


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # mtg's type_hostport_test.go
        (":", "incorrect port"),
        (":800", "empty host"),
        ("127.0.0.1:8000000", "incorrect port"),
        ("12...:80", "not an IP address"),
        ("", "missing port"),
        ("localhost", "missing port"),
        ("google.com:", "incorrect port"),
        # more
        ("example.com:443", "not an IP address"),
        ("::1:443", "too many colons"),
        ("[::1]", "missing port"),
        ("[::1]x:80", "missing port"),
        ("[::1]:80:", "too many colons"),
        ("[::1:80", "missing ']'"),
        ("1.2.3.4:0", "incorrect port"),
        ("1.2.3.4:-1", "incorrect port"),
        ("1.2.3.4:+80", "incorrect port"),
        ("1.2.3.4: 80", "incorrect port"),
        ("[fe80::1%eth0]:80", "not an IP address"),
        ("01.2.3.4:80", "not an IP address"),
        ("1.2.3.4]:80", "unexpected bracket"),
        ("[[::1]]:80", "missing port"),
        ("[::[1]:80", "unexpected bracket"),
        ("1.2.3.4:\u0661\u0662", "incorrect port"),
        ("1.2.3.4:" + "9" * 5000, "incorrect port"),  # Arabic-Indic digits are not digits here
    ],
)
def test_parse_host_port_errors(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_host_port(text)


@pytest.mark.parametrize("value", [1, 443, 65535])
def test_parse_port_ok(value: int) -> None:
    assert parse_port(value) == value


# mtg's type_port_test.go: "", "port", "0", "-1", "1.5", "70000" (the string/float ones are
# TOML type errors here, see test_wrong_toml_type; 0 means "default" at the document level).
@pytest.mark.parametrize("value", [0, -1, 65536, 70000])
def test_parse_port_errors(value: int) -> None:
    with pytest.raises(ConfigError, match="incorrect port number"):
        parse_port(value)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        # mtg's type_ip_test.go
        ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "2001:db8:85a3::8a2e:370:7334"),
        ("127.0.0.1", "127.0.0.1"),
        ("::", "::"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("::1.2.3.4", "::102:304"),
    ],
)
def test_parse_ip_ok(text: str, canonical: str) -> None:
    assert parse_ip(text) == canonical


@pytest.mark.parametrize(
    "text",
    [
        # mtg's type_ip_test.go
        "",
        "....",
        "0...",
        "300.200.200.800",
        "[]",
        # more
        "[::1]",
        "fe80::1%eth0",
        "01.2.3.4",
        " 1.2.3.4",
        "1.2.3",
        "localhost",
    ],
)
def test_parse_ip_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="incorrect ip"):
        parse_ip(text)


# ---------------------------------------------------------------------------------------------
# [dc-overrides] addresses


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:9443", ("127.0.0.1", 9443)),
        ("[::1]:443", ("::1", 443)),
        ("[2001:0DB8::1]:443", ("2001:db8::1", 443)),
        ("dc.example.com:443", ("dc.example.com", 443)),
        ("dc2:8443", ("dc2", 8443)),
        ("dc.example.com.:443", ("dc.example.com.", 443)),
        ("my_dc-1.internal:1", ("my_dc-1.internal", 1)),
    ],
)
def test_parse_dc_address_ok(text: str, address: tuple[str, int]) -> None:
    assert parse_dc_address(text) == address


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("dc.example.com", "missing port"),
        (":443", "empty host"),
        ("1.2.3:443", "neither an IP address nor a valid host name"),
        ("01.2.3.4:443", "neither an IP address nor a valid host name"),
        ("bad host:443", "neither an IP address nor a valid host name"),
        ("-bad.example:443", "neither an IP address nor a valid host name"),
        ("a..b:443", "neither an IP address nor a valid host name"),
        ("::1:443", "too many colons"),
        ("127.0.0.1:0", "incorrect port"),
        ("127.0.0.1:65536", "incorrect port"),
        ("x" * 64 + ".example:443", "neither an IP address nor a valid host name"),
    ],
)
def test_parse_dc_address_errors(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_dc_address(text)


# ---------------------------------------------------------------------------------------------
# CIDR networks (proxy-protocol-trusted, ours; the rules of the IP list files)


@pytest.mark.parametrize(
    ("text", "network"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3/8", "10.0.0.0/8"),  # host bits are dropped
        ("127.0.0.1", "127.0.0.1/32"),
        ("::1", "::1/128"),
        ("fd00::/8", "fd00::/8"),
        ("2001:DB8::1/32", "2001:db8::/32"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("10.0.0.0/08", "10.0.0.0/8"),
    ],
)
def test_parse_cidr_ok(text: str, network: str) -> None:
    parsed = parse_cidr(text)
    assert parsed == ipaddress.ip_network(network)
    assert str(parsed) == network


@pytest.mark.parametrize(
    "text",
    [
        "",
        "x",
        "10.0.0.0/33",
        "::/129",
        "10.0.0.0/",
        "10.0.0.0/-1",
        "10.0.0.0/+8",
        "10.0.0.0/255.0.0.0",
        "10.0.0.0/\u0668",  # an Arabic-Indic digit is not a prefix length
        "fe80::1%eth0",
        "fe80::/10%eth0",
        "01.2.3.4",
        " 10.0.0.0/8",
        "10.0.0.0/8/8",
        "10.0.0.0/" + "9" * 5000,
    ],
)
def test_parse_cidr_errors(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_cidr(text)
    assert str(info.value) == f"incorrect network {text!r}: expected an IP address or CIDR"


# ---------------------------------------------------------------------------------------------
# NTP servers ([doctor] ntp-servers, ours)


@pytest.mark.parametrize(
    ("text", "server", "printed"),
    [
        ("pool.ntp.org", ("pool.ntp.org", 123), "pool.ntp.org"),
        ("pool.ntp.org:123", ("pool.ntp.org", 123), "pool.ntp.org"),
        ("time.example:1123", ("time.example", 1123), "time.example:1123"),
        ("127.0.0.1", ("127.0.0.1", 123), "127.0.0.1"),
        ("127.0.0.1:9", ("127.0.0.1", 9), "127.0.0.1:9"),
        ("::1", ("::1", 123), "::1"),
        ("[::1]", ("::1", 123), "::1"),
        ("[2001:DB8::1]:9", ("2001:db8::1", 9), "[2001:db8::1]:9"),
        ("::ffff:10.0.0.1", ("10.0.0.1", 123), "10.0.0.1"),
        ("[time.example]:9", ("time.example", 9), "time.example:9"),  # as Go's SplitHostPort
    ],
)
def test_parse_ntp_server_ok(text: str, server: tuple[str, int], printed: str) -> None:
    assert parse_ntp_server(text) == server
    assert format_ntp_server(server) == printed
    assert parse_ntp_server(printed) == server


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty host: $"),
        (":123", "empty host: :123"),
        ("h.example:0", r"incorrect port number \(h.example:0\)"),
        ("h.example:", "incorrect port number"),
        ("h.example:ntp", "incorrect port number"),
        ("bad host", "host is neither an IP address nor a valid host name: bad host"),
        ("1.2.3", "host is neither an IP address nor a valid host name"),
        ("a:b:c", "too many colons in address: a:b:c"),
        ("[::1", "missing ']' in address"),
        ("[::1]x", "missing port in address"),
    ],
)
def test_parse_ntp_server_errors(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_ntp_server(text)


def test_ntp_port() -> None:
    assert NTP_PORT == 123


# ---------------------------------------------------------------------------------------------
# Fuzzing: hostile text raises ConfigError and nothing else


@pytest.mark.parametrize(
    "parser", [parse_ip, parse_host_port, parse_cidr, parse_dc_address, parse_ntp_server]
)
@settings(max_examples=150, deadline=None)
@given(text=HOSTILE_TEXT)
def test_address_parsers_raise_only_config_error(parser: Any, text: str) -> None:
    raises_only_config_error(parser, text)


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet="0123456789abcdef:.[]%/", max_size=45))
def test_address_parsers_raise_only_config_error_on_address_like_text(text: str) -> None:
    for parser in (parse_ip, parse_host_port, parse_cidr, parse_dc_address, parse_ntp_server):
        raises_only_config_error(parser, text)


@given(st.integers())
def test_parse_port_raises_only_config_error(value: int) -> None:
    raises_only_config_error(parse_port, value)


@given(host=st.ip_addresses(), port=st.integers(min_value=1, max_value=65535))
def test_host_port_round_trips(host: Any, port: int) -> None:
    parsed = parse_host_port(str(HostPort(str(host), port)))
    expected = str(host.ipv4_mapped or host) if host.version == 6 else str(host)
    assert parsed == HostPort(expected, port)
