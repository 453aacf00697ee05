"""FireHOL netsets: ``parse_netset`` (never raises) and ``IPList`` lookups.

Input: a downloaded list, decoded as the updater decodes it (UTF-8, errors replaced).
"""

from __future__ import annotations

import ipaddress

from mtgworkers.defense.iplist import IPList, parse_netset

MAX_LEN = 4096
PROBES = ("1.2.3.4", "10.0.0.1", "255.255.255.255", "::1", "2001:db8::1", "fe80::1%eth0")


def fuzz_one(data: bytes) -> None:
    networks, bad = parse_netset(data.decode("utf-8", errors="replace"))
    if bad is not None:
        assert bad.count >= 1 and bad.first_line >= 1
        str(bad)
    table = IPList(networks)
    assert len(table) == len(networks)
    for network in networks[:16]:
        assert network.network_address in table, network
    for probe in PROBES:
        inside = probe in table
        address = ipaddress.ip_address(probe.partition("%")[0])
        if address.version == 4:
            assert (f"::ffff:{probe}" in table) == inside
