from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtgworkers.defense.iplist import BadLines, IPList, Network, parse_netset

FIREHOL_SAMPLE = """\
#
# firehol_level1
#
# ipv4 hash:net ipset
#
# Maintainer      : FireHOL team
#

0.0.0.0/8
1.10.16.0/20
5.188.10.0/23   # trailing comment
  31.24.81.0/24
\t
185.244.25.187
2001:db8::/32
2001:db8:ffff::1
"""


def _net(text: str) -> Network:
    return ipaddress.ip_network(text, strict=False)


# --- parse_netset -----------------------------------------------------------------------------


def test_parse_firehol_sample() -> None:
    networks, error = parse_netset(FIREHOL_SAMPLE)
    assert error is None
    assert networks == [
        _net("0.0.0.0/8"),
        _net("1.10.16.0/20"),
        _net("5.188.10.0/23"),
        _net("31.24.81.0/24"),
        _net("185.244.25.187/32"),
        _net("2001:db8::/32"),
        _net("2001:db8:ffff::1/128"),
    ]


def test_parse_empty_and_comments_only() -> None:
    assert parse_netset("") == ([], None)
    assert parse_netset("# nothing\n\n   # here\r\n") == ([], None)


def test_parse_crlf_and_host_bits() -> None:
    networks, error = parse_netset("10.1.2.3/8\r\n192.168.1.1\r\n")
    assert error is None
    assert networks == [_net("10.0.0.0/8"), _net("192.168.1.1/32")]


def test_bad_lines_are_skipped_counted_and_the_first_named() -> None:
    text = "1.2.3.0/24\n# comment\n\n5.6.7.8\nnot-an-ip\n9.9.9.9\n1.2.3.4/33 # too long\n::1\n"
    networks, bad = parse_netset(text)
    assert networks == [_net("1.2.3.0/24"), _net("5.6.7.8/32"), _net("9.9.9.9/32"), _net("::1")]
    assert bad == BadLines(count=2, first_line=5, first_text="not-an-ip")
    assert str(bad) == "line 5: cannot parse 'not-an-ip' as an IP address or CIDR"


def test_the_first_bad_line_is_truncated() -> None:
    junk = "x" * 10_000  # e.g. a binary file that is one long line
    networks, bad = parse_netset(f"10.0.0.0/8\n{junk}\n{junk}\n192.0.2.1\n")
    assert networks == [_net("10.0.0.0/8"), _net("192.0.2.1")]
    assert bad is not None
    assert (bad.count, bad.first_line) == (2, 2)
    assert bad.first_text == "x" * 60 + "…"
    assert len(str(bad)) < 120


@pytest.mark.parametrize(
    "line",
    [
        "1.2.3.4/33",
        "::/129",
        "1.2.3",
        "1.2.3.4.5",
        "256.1.1.1",
        "01.2.3.4",
        "1.2.3.4/255.255.255.0",
        "1.2.3.4/",
        "/24",
        "1.2.3.4/-1",
        "1.2.3.4/ 8",
        "fe80::1%eth0",
        "1.2.3.4 5.6.7.8",
        "example.com",
        "2001:db8:::1",
    ],
)
def test_bad_lines(line: str) -> None:
    networks, bad = parse_netset(f"8.8.8.8\n{line}\n9.9.9.9")
    assert networks == [_net("8.8.8.8/32"), _net("9.9.9.9/32")]
    assert bad == BadLines(count=1, first_line=2, first_text=line)


@given(st.text(max_size=300))
def test_parse_never_raises(text: str) -> None:
    networks, bad = parse_netset(text)
    assert all(isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network)) for n in networks)
    entries = [line for line in text.split("\n") if line.partition("#")[0].strip()]
    if bad is None:
        assert len(networks) == len(entries)
    else:
        assert len(networks) + bad.count == len(entries)
        assert str(bad).startswith(f"line {bad.first_line}: ")


# --- IPList -----------------------------------------------------------------------------------


def test_membership_v4_and_v6() -> None:
    iplist = IPList(parse_netset(FIREHOL_SAMPLE)[0])
    assert "0.0.0.0" in iplist
    assert "0.255.255.255" in iplist
    assert "1.0.0.0" not in iplist
    assert "1.10.16.0" in iplist
    assert "1.10.31.255" in iplist
    assert "1.10.32.0" not in iplist
    assert "185.244.25.187" in iplist
    assert "185.244.25.186" not in iplist
    assert "185.244.25.188" not in iplist
    assert "2001:db8:1::5" in iplist
    assert "2001:db9::" not in iplist
    assert ipaddress.ip_address("31.24.81.77") in iplist
    assert ipaddress.ip_address("::1") not in iplist


def test_ipv4_mapped_addresses_match_as_ipv4() -> None:
    iplist = IPList([_net("10.0.0.0/8")])
    assert "::ffff:10.1.2.3" in iplist
    assert ipaddress.ip_address("::ffff:10.1.2.3") in iplist
    assert "::ffff:11.1.2.3" not in iplist
    # not mapped: the IPv4-compatible (deprecated) form is plain IPv6
    assert "::10.1.2.3" not in iplist


def test_ipv4_mapped_entries_match_ipv4() -> None:
    networks, error = parse_netset("::ffff:192.0.2.0/120\n::ffff:198.51.100.7\n")
    assert error is None
    iplist = IPList(networks)
    assert "192.0.2.200" in iplist
    assert "::ffff:192.0.2.1" in iplist
    assert "198.51.100.7" in iplist
    assert "198.51.100.8" not in iplist


def test_disabled_allowlist_allows_everybody() -> None:
    allow_all = IPList([_net("0.0.0.0/0"), _net("::/0")])
    assert len(allow_all) == 2
    for ip in ("1.2.3.4", "255.255.255.255", "::", "2001:db8::1", "::ffff:1.2.3.4"):
        assert ip in allow_all


def test_empty_list() -> None:
    empty = IPList([])
    assert len(empty) == 0
    assert "1.2.3.4" not in empty
    assert "::1" not in empty


def test_len_counts_entries_not_merged_ranges() -> None:
    iplist = IPList([_net("10.0.0.0/8"), _net("10.0.0.0/8"), _net("10.1.0.0/16"), _net("::1")])
    assert len(iplist) == 4
    assert "10.200.0.1" in iplist


def test_adjacent_and_overlapping_ranges_merge() -> None:
    iplist = IPList([_net("10.0.0.0/24"), _net("10.0.1.0/24"), _net("10.0.0.128/25")])
    assert "10.0.0.255" in iplist
    assert "10.0.1.0" in iplist
    assert "10.0.2.0" not in iplist
    assert "9.255.255.255" not in iplist


def test_zone_id_is_ignored() -> None:
    iplist = IPList([_net("fe80::/10")])
    assert "fe80::1%eth0" in iplist


def test_bad_queries() -> None:
    iplist = IPList([_net("10.0.0.0/8")])
    with pytest.raises(ValueError):
        _ = "not an ip" in iplist
    with pytest.raises(TypeError):
        _ = 12345 in iplist


def test_repr() -> None:
    assert repr(IPList([_net("10.0.0.0/8"), _net("::1")])) == (
        "IPList(2 entries, 1 IPv4 ranges, 1 IPv6 ranges)"
    )


# --- property test against a naive implementation ---------------------------------------------

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _naive_contains(networks: list[Network], ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for network in networks:
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
            v4 = ipaddress.IPv4Network(
                (
                    int(network.network_address) - int(_MAPPED.network_address),
                    network.prefixlen - 96,
                )
            )
            if address in v4:
                return True
        elif address in network:
            return True
    return False


@st.composite
def _v4_networks(draw: st.DrawFn) -> Network:
    # Cluster in a small space so ranges overlap and touch.
    value = draw(st.integers(0, 2**12 - 1)) << 20 | draw(st.integers(0, 2**20 - 1))
    prefix = draw(st.integers(0, 32))
    return ipaddress.IPv4Network((value, prefix), strict=False)


@st.composite
def _v6_networks(draw: st.DrawFn) -> Network:
    value = draw(st.integers(0, 2**8 - 1)) << 120 | draw(st.integers(0, 2**20 - 1))
    prefix = draw(st.integers(0, 128))
    return ipaddress.IPv6Network((value, prefix), strict=False)


@st.composite
def _mapped_networks(draw: st.DrawFn) -> Network:
    v4 = draw(_v4_networks())
    return ipaddress.IPv6Network(
        (int(_MAPPED.network_address) + int(v4.network_address), v4.prefixlen + 96)
    )


_networks = st.lists(st.one_of(_v4_networks(), _v6_networks(), _mapped_networks()), max_size=20)


def _probes(networks: list[Network], extra: list[int]) -> list[str]:
    """Boundary addresses of every network (and one past each end), plus random ones."""
    probes: list[str] = []
    for network in networks:
        first, last = int(network.network_address), int(network.broadcast_address)
        top = 2**network.max_prefixlen - 1
        for value in (first - 1, first, last, last + 1):
            if 0 <= value <= top:
                address: ipaddress.IPv4Address | ipaddress.IPv6Address = (
                    ipaddress.IPv4Address(value)
                    if network.version == 4
                    else ipaddress.IPv6Address(value)
                )
                probes.append(str(address))
    for value in extra:
        probes.append(str(ipaddress.IPv4Address(value % 2**32)))
        probes.append(str(ipaddress.IPv6Address(value)))
        probes.append(f"::ffff:{ipaddress.IPv4Address(value % 2**32)}")
    return probes


@given(
    networks=_networks,
    extra=st.lists(st.integers(0, 2**128 - 1), max_size=10),
)
def test_matches_naive_implementation(networks: list[Network], extra: list[int]) -> None:
    iplist = IPList(networks)
    assert len(iplist) == len(networks)
    for probe in _probes(networks, extra):
        assert (probe in iplist) == _naive_contains(networks, probe), probe


@given(networks=_networks)
def test_parse_round_trip(networks: list[Network]) -> None:
    text = "\n".join(f"{n}  # entry {i}" for i, n in enumerate(networks))
    assert parse_netset(text) == (networks, None)
