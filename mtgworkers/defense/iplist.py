"""IP allow/blocklists: FireHOL netset parsing and fast membership (docs/protocol.md §9).

:func:`parse_netset` turns the text of one list into networks. :class:`IPList` is an immutable
snapshot built from networks of any number of lists; lookups are a binary search over sorted,
merged integer ranges, one table per address family.

IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``, what a dual-stack listener reports for IPv4
clients) are looked up as IPv4. Entries written as IPv4-mapped IPv6 networks inside
``::ffff:0:0/96`` are likewise stored as the IPv4 networks they denote.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

__all__ = ["BadLines", "IPList", "Network", "parse_netset"]

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_V4_MAPPED_FIRST = int(_V4_MAPPED.network_address)

# How much of the first bad line BadLines keeps (a binary file can be one huge "line").
_SHOWN_CHARS = 60


@dataclass(frozen=True, slots=True)
class BadLines:
    """The unparsable lines of one netset: how many, and the first one.

    ``first_line`` is 1-based; ``first_text`` is that line without its comment and
    surrounding blanks, cut to 60 characters (then ending in ``…``).
    """

    count: int
    first_line: int
    first_text: str

    def __str__(self) -> str:
        return f"line {self.first_line}: cannot parse {self.first_text!r} as an IP address or CIDR"


def _parse_entry(text: str) -> Network:
    # Stricter than ipaddress on purpose, to accept what Go's net.ParseCIDR / net.ParseIP accept:
    # no zone ids and only a decimal prefix length (no "a.b.c.d/255.255.255.0").
    if "%" in text:
        raise ValueError(text)
    address, slash, prefix = text.partition("/")
    if slash:
        if not (prefix.isascii() and prefix.isdigit()):
            raise ValueError(text)
        return ipaddress.ip_network(f"{address}/{int(prefix)}", strict=False)
    return ipaddress.ip_network(ipaddress.ip_address(address))


def parse_netset(text: str) -> tuple[list[Network], BadLines | None]:
    """Parse a FireHOL netset: one CIDR or single IP per line, ``#`` comments, blank lines.

    Returns ``(networks, bad)``: every entry that parsed, and None or the count and the
    first of the lines that did not, which are skipped (mtg stops at the first one and
    drops the rest of the list). Never raises.
    """
    networks: list[Network] = []
    bad_count = 0
    first_bad: tuple[int, str] | None = None
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.partition("#")[0].strip()
        if not line:
            continue
        try:
            networks.append(_parse_entry(line))
        except ValueError:
            bad_count += 1
            if first_bad is None:
                shown = line if len(line) <= _SHOWN_CHARS else line[:_SHOWN_CHARS] + "…"
                first_bad = (number, shown)
    if first_bad is None:
        return networks, None
    return networks, BadLines(bad_count, *first_bad)


def _to_range(network: Network) -> tuple[int, int, int]:
    """(version, first, last) with IPv4-mapped IPv6 networks turned into IPv4."""
    first = int(network.network_address)
    last = int(network.broadcast_address)
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_V4_MAPPED):
        return 4, first - _V4_MAPPED_FIRST, last - _V4_MAPPED_FIRST
    return network.version, first, last


def _merge(ranges: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    starts: list[int] = []
    ends: list[int] = []
    for first, last in sorted(ranges):
        if ends and first <= ends[-1] + 1:
            if last > ends[-1]:
                ends[-1] = last
        else:
            starts.append(first)
            ends.append(last)
    return starts, ends


class IPList:
    """Immutable set of networks with fast ``ip in iplist`` lookups.

    ``len()`` is the number of entries given (CIDR entries, not addresses), as mtg's
    ``iplist_size`` metric reports it.
    """

    __slots__ = ("_count", "_v4_ends", "_v4_starts", "_v6_ends", "_v6_starts")

    def __init__(self, networks: Iterable[Network]) -> None:
        """Build the lookup tables from IPv4/IPv6 networks (duplicates and overlaps are fine)."""
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        count = 0
        for network in networks:
            count += 1
            version, first, last = _to_range(network)
            (v4 if version == 4 else v6).append((first, last))
        self._count = count
        self._v4_starts, self._v4_ends = _merge(v4)
        self._v6_starts, self._v6_ends = _merge(v6)

    def __contains__(self, ip: object) -> bool:
        """True if ``ip`` (a string or ipaddress address) is in one of the networks.

        IPv4-mapped IPv6 addresses are matched as IPv4; an IPv6 zone id is ignored.
        Raises ValueError if ``ip`` is a string that is not an IP address, TypeError for
        other types.
        """
        address: Address
        if isinstance(ip, str):
            address = ipaddress.ip_address(ip)
        elif isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            address = ip
        else:
            raise TypeError(f"expected an IP address, got {type(ip).__name__}")

        if isinstance(address, ipaddress.IPv6Address):
            mapped = address.ipv4_mapped
            if mapped is None:
                return _lookup(self._v6_starts, self._v6_ends, int(address))
            address = mapped
        return _lookup(self._v4_starts, self._v4_ends, int(address))

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (
            f"IPList({self._count} entries, "
            f"{len(self._v4_starts)} IPv4 ranges, {len(self._v6_starts)} IPv6 ranges)"
        )


def _lookup(starts: list[int], ends: list[int], value: int) -> bool:
    i = bisect_right(starts, value) - 1
    return i >= 0 and value <= ends[i]
