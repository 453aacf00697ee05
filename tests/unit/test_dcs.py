from __future__ import annotations

import ipaddress
import random
import socket
from types import MappingProxyType

import pytest

from mtgworkers.config import PreferIP
from mtgworkers.dcs import DC_ADDRESSES_V4, DC_ADDRESSES_V6, DC_PORT, DCTable

TABLE_V4 = {
    1: {"149.154.175.50"},
    2: {"149.154.167.51", "95.161.76.100"},
    3: {"149.154.175.100"},
    4: {"149.154.167.91"},
    5: {"149.154.171.5"},
    203: {"91.105.192.100"},
}
TABLE_V6 = {
    1: {"2001:b28:f23d:f001::a"},
    2: {"2001:67c:4e8:f002::a"},
    3: {"2001:b28:f23d:f003::a"},
    4: {"2001:67c:4e8:f004::a"},
    5: {"2001:b28:f23f:f005::a"},
    203: {"2a0a:f280:203:a:5000::100"},
}


def _version(host: str) -> int:
    return ipaddress.ip_address(host).version


def test_builtin_table() -> None:
    assert DC_PORT == 443
    assert {dc: set(a) for dc, a in DC_ADDRESSES_V4.items()} == TABLE_V4
    assert {dc: set(a) for dc, a in DC_ADDRESSES_V6.items()} == TABLE_V6
    for addresses in (*DC_ADDRESSES_V4.values(), *DC_ADDRESSES_V6.values()):
        for host in addresses:
            # canonical text form, so the strings compare equal to what sockets report
            assert str(ipaddress.ip_address(host)) == host


@pytest.mark.parametrize("dc", sorted(TABLE_V4))
def test_prefer_ipv6_default_order(dc: int) -> None:
    result = DCTable().addresses(dc, "prefer-ipv6")
    assert all(port == 443 for _, port in result)
    hosts = [host for host, _ in result]
    n6 = len(TABLE_V6[dc])
    assert set(hosts[:n6]) == TABLE_V6[dc]
    assert set(hosts[n6:]) == TABLE_V4[dc]
    assert len(hosts) == n6 + len(TABLE_V4[dc])


@pytest.mark.parametrize("dc", sorted(TABLE_V4))
def test_prefer_ipv4(dc: int) -> None:
    hosts = [host for host, _ in DCTable().addresses(dc, "prefer-ipv4")]
    n4 = len(TABLE_V4[dc])
    assert set(hosts[:n4]) == TABLE_V4[dc]
    assert set(hosts[n4:]) == TABLE_V6[dc]


@pytest.mark.parametrize("dc", sorted(TABLE_V4))
def test_only_families(dc: int) -> None:
    table = DCTable()
    only4 = table.addresses(dc, "only-ipv4")
    only6 = table.addresses(dc, "only-ipv6")
    assert {h for h, _ in only4} == TABLE_V4[dc]
    assert len(only4) == len(TABLE_V4[dc])
    assert {h for h, _ in only6} == TABLE_V6[dc]
    assert len(only6) == len(TABLE_V6[dc])


@pytest.mark.parametrize("value", ["PREFER-IPV4", "Prefer-IPv4", "prefer-ipv4"])
def test_prefer_ip_case_insensitive(value: str) -> None:
    hosts = [h for h, _ in DCTable().addresses(1, value)]
    assert [_version(h) for h in hosts] == [4, 6]
    assert DCTable().known(1, value.upper())


@pytest.mark.parametrize("value", ["", "ipv4", "prefer_ipv4", "only-ipv5", "any"])
def test_bad_prefer_ip(value: str) -> None:
    message = (
        f"unknown prefer-ip value {value!r}: expected one of prefer-ipv6, prefer-ipv4, "
        "only-ipv6, only-ipv4"
    )
    with pytest.raises(ValueError) as info:
        DCTable().addresses(2, value)
    assert str(info.value) == message
    with pytest.raises(ValueError, match="prefer-ip"):
        DCTable().known(2, value)


@pytest.mark.parametrize("prefer", list(PreferIP))
def test_prefer_ip_enum_and_text_agree(prefer: PreferIP) -> None:
    table = DCTable(overrides=MappingProxyType({7: (("10.0.0.7", 443), ("::7", 443))}))
    rng = random.Random(1)
    by_enum = table.addresses(2, prefer, random.Random(1))
    assert by_enum == table.addresses(2, prefer.value.upper(), rng)
    assert table.addresses(7, prefer) == table.addresses(7, str(prefer))
    assert table.known(2, prefer) and table.known(7, prefer)


def test_shuffle_within_family_uses_rng() -> None:
    table = DCTable()
    orders = {
        tuple(h for h, _ in table.addresses(2, "prefer-ipv4", random.Random(seed)))
        for seed in range(40)
    }
    assert orders == {
        ("149.154.167.51", "95.161.76.100", "2001:67c:4e8:f002::a"),
        ("95.161.76.100", "149.154.167.51", "2001:67c:4e8:f002::a"),
    }
    same_seed = {tuple(table.addresses(2, "prefer-ipv6", random.Random(5))) for _ in range(10)}
    assert len(same_seed) == 1


def test_shuffle_without_rng_uses_random_module() -> None:
    table = DCTable()
    seen = {tuple(table.addresses(2, "only-ipv4")) for _ in range(200)}
    assert len(seen) == 2


def test_builtin_table_is_not_modified() -> None:
    before = dict(DC_ADDRESSES_V4)
    for _ in range(20):
        DCTable().addresses(2, "prefer-ipv6")
    assert before == DC_ADDRESSES_V4


@pytest.mark.parametrize("dc", [0, 6, 7, 100, 202, 204, 10002, -2])
def test_unknown_dcs(dc: int) -> None:
    table = DCTable()
    for prefer in ("prefer-ipv6", "prefer-ipv4", "only-ipv4", "only-ipv6"):
        assert table.addresses(dc, prefer) == []
        assert table.known(dc, prefer) is False


@pytest.mark.parametrize("dc", sorted(TABLE_V4))
def test_known_builtin(dc: int) -> None:
    table = DCTable()
    for prefer in ("prefer-ipv6", "prefer-ipv4", "only-ipv4", "only-ipv6"):
        assert table.known(dc, prefer) is True


# --- overrides --------------------------------------------------------------------------------


def test_override_replaces_builtin_and_keeps_order() -> None:
    table = DCTable(
        overrides={2: (("127.0.0.1", 4002), ("::1", 4003), ("127.0.0.2", 4004))},
    )
    for _ in range(10):
        assert table.addresses(2, "prefer-ipv6") == [
            ("127.0.0.1", 4002),
            ("::1", 4003),
            ("127.0.0.2", 4004),
        ]
    assert table.addresses(2, "prefer-ipv4") == table.addresses(2, "prefer-ipv6")
    # other DCs keep the built-ins
    assert {h for h, _ in table.addresses(4, "only-ipv4")} == TABLE_V4[4]


def test_override_adds_test_dc() -> None:
    table = DCTable(overrides=MappingProxyType({10002: (("127.0.0.1", 5555),)}))
    assert table.addresses(10002, "prefer-ipv6") == [("127.0.0.1", 5555)]
    assert table.known(10002, "prefer-ipv6")
    assert not table.known(10004, "prefer-ipv6")


def test_override_family_filter_only_for_only_modes() -> None:
    table = DCTable(
        overrides={
            3: (("dc3.example", 443), ("127.0.0.1", 1), ("::1", 2), ("[::2]", 3)),
        }
    )
    assert table.addresses(3, "only-ipv4") == [("dc3.example", 443), ("127.0.0.1", 1)]
    assert table.addresses(3, "ONLY-IPV6") == [("dc3.example", 443), ("::1", 2), ("[::2]", 3)]
    assert len(table.addresses(3, "prefer-ipv4")) == 4


def test_override_known_depends_on_family() -> None:
    table = DCTable(overrides={2: (("::1", 443),), 5: ()})
    assert table.known(2, "prefer-ipv4")
    assert table.known(2, "only-ipv6")
    assert not table.known(2, "only-ipv4")
    assert table.addresses(2, "only-ipv4") == []
    # an empty override removes the DC
    assert not table.known(5, "prefer-ipv6")
    assert table.addresses(5, "prefer-ipv6") == []


def test_returns_fresh_lists() -> None:
    table = DCTable(overrides={2: (("127.0.0.1", 1),)})
    first = table.addresses(2, "prefer-ipv6")
    first.append(("x", 1))
    assert table.addresses(2, "prefer-ipv6") == [("127.0.0.1", 1)]


# --- auto-updated addresses (auto-update, docs/protocol.md §5.4) ----------------------------------

AUTO_V4 = (("149.154.175.211", 8888), ("91.108.56.200", 8888), ("91.108.56.201", 8888))
AUTO_V6 = (("2001:b28:f23d:f003::d", 8888),)


def test_auto_addresses_follow_the_builtins_of_their_family() -> None:
    table = DCTable()
    table.set_auto_addresses(203, socket.AF_INET, AUTO_V4)
    table.set_auto_addresses(203, socket.AF_INET6, AUTO_V6)
    for _ in range(20):
        result = table.addresses(203, "prefer-ipv6")
        assert result[0] == ("2a0a:f280:203:a:5000::100", 443)
        assert result[1] == AUTO_V6[0]
        assert result[2] == ("91.105.192.100", 443)
        assert set(result[3:]) == set(AUTO_V4)
        assert len(result) == 6
    result = table.addresses(203, "prefer-ipv4")
    assert result[0] == ("91.105.192.100", 443)
    assert set(result[1:4]) == set(AUTO_V4)
    assert result[4:] == [("2a0a:f280:203:a:5000::100", 443), AUTO_V6[0]]
    assert table.addresses(203, "only-ipv6") == [("2a0a:f280:203:a:5000::100", 443), AUTO_V6[0]]
    only4 = table.addresses(203, "only-ipv4")
    assert only4[0] == ("91.105.192.100", 443) and set(only4[1:]) == set(AUTO_V4)


def test_auto_addresses_are_shuffled_with_the_rng() -> None:
    table = DCTable()
    table.set_auto_addresses(203, socket.AF_INET, AUTO_V4)
    orders = {tuple(table.addresses(203, "only-ipv4", random.Random(seed))) for seed in range(60)}
    assert len(orders) == 6  # every permutation of the three auto addresses, builtin first
    assert all(order[0] == ("91.105.192.100", 443) for order in orders)
    same = {tuple(table.addresses(203, "only-ipv4", random.Random(7))) for _ in range(5)}
    assert len(same) == 1


def test_auto_addresses_replace_and_clear() -> None:
    table = DCTable()
    table.set_auto_addresses(203, socket.AF_INET, AUTO_V4)
    table.set_auto_addresses(203, socket.AF_INET, [("10.0.0.1", 8888)])
    assert table.addresses(203, "only-ipv4") == [("91.105.192.100", 443), ("10.0.0.1", 8888)]
    assert table.auto.get(socket.AF_INET, 203) == (("10.0.0.1", 8888),)
    table.set_auto_addresses(203, socket.AF_INET, [])
    assert table.addresses(203, "only-ipv4") == [("91.105.192.100", 443)]
    assert table.auto.get(socket.AF_INET, 203) == ()
    # the other family was never touched
    assert table.auto.get(socket.AF_INET6, 203) == ()


def test_auto_address_equal_to_a_builtin_is_not_repeated() -> None:
    table = DCTable()
    table.set_auto_addresses(203, socket.AF_INET, [("91.105.192.100", 443), ("10.0.0.2", 8888)])
    assert table.addresses(203, "only-ipv4") == [("91.105.192.100", 443), ("10.0.0.2", 8888)]


def test_auto_addresses_make_a_dc_known() -> None:
    table = DCTable()
    assert not table.known(7, "prefer-ipv6")
    table.set_auto_addresses(7, socket.AF_INET6, [("2001:db8::7", 8888)])
    assert table.known(7, "prefer-ipv6")
    assert table.known(7, "only-ipv6")
    assert not table.known(7, "only-ipv4")
    assert table.addresses(7, "prefer-ipv4") == [("2001:db8::7", 8888)]


def test_auto_addresses_do_not_touch_overridden_dcs_or_other_tables() -> None:
    table = DCTable(overrides={203: (("127.0.0.1", 5000),)})
    table.set_auto_addresses(203, socket.AF_INET, AUTO_V4)
    assert table.addresses(203, "prefer-ipv4") == [("127.0.0.1", 5000)]
    assert DCTable().addresses(203, "only-ipv4") == [("91.105.192.100", 443)]
    assert DCTable() == DCTable()  # the mutable part is not compared


def test_auto_addresses_reject_unknown_families() -> None:
    with pytest.raises(ValueError, match="family"):
        DCTable().set_auto_addresses(203, socket.AF_UNIX, AUTO_V4)
