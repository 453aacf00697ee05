"""Telegram DC addresses and the order in which to try them (protocol.md §5).

The built-in table is mtg's (§5.1): DCs 1-5 and 203, all on port 443. ``[dc-overrides]`` in the
config replace the built-in addresses of a DC, or add a DC the table does not know (test DCs
such as 10002, or everything pointed at 127.0.0.1 in tests).
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "DC_ADDRESSES_V4",
    "DC_ADDRESSES_V6",
    "DC_PORT",
    "PREFER_IP_VALUES",
    "DCTable",
]

DC_PORT = 443

DC_ADDRESSES_V4: dict[int, tuple[str, ...]] = {
    1: ("149.154.175.50",),
    2: ("149.154.167.51", "95.161.76.100"),
    3: ("149.154.175.100",),
    4: ("149.154.167.91",),
    5: ("149.154.171.5",),
    203: ("91.105.192.100",),
}

DC_ADDRESSES_V6: dict[int, tuple[str, ...]] = {
    1: ("2001:b28:f23d:f001::a",),
    2: ("2001:67c:4e8:f002::a",),
    3: ("2001:b28:f23d:f003::a",),
    4: ("2001:67c:4e8:f004::a",),
    5: ("2001:b28:f23f:f005::a",),
    203: ("2a0a:f280:203:a:5000::100",),
}

PREFER_IP_VALUES = ("prefer-ipv6", "prefer-ipv4", "only-ipv6", "only-ipv4")


def _ip_version(host: str) -> int | None:
    """4 or 6 for an IP literal, None for a host name."""
    try:
        return ipaddress.ip_address(host.strip("[]")).version
    except ValueError:
        return None


def _normalise_prefer_ip(prefer_ip: str) -> str:
    value = prefer_ip.lower()
    if value not in PREFER_IP_VALUES:
        raise ValueError(
            f"unknown prefer-ip value {prefer_ip!r}: expected one of {', '.join(PREFER_IP_VALUES)}"
        )
    return value


@dataclass(frozen=True)
class DCTable:
    """Where each DC lives. ``overrides`` maps a DC number to ``(host, port)`` pairs that
    replace the built-in addresses of that DC (the config's ``[dc-overrides]``)."""

    overrides: Mapping[int, tuple[tuple[str, int], ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def addresses(
        self, dc: int, prefer_ip: str, rng: random.Random | None = None
    ) -> list[tuple[str, int]]:
        """Addresses to try, in order, for DC number ``dc`` (positive, after the dc_number rule).

        Built-in addresses: each family shuffled (``rng``, default the ``random`` module), then
        ``prefer-ipv6`` gives IPv6 before IPv4, ``prefer-ipv4`` the reverse, ``only-ipv4`` /
        ``only-ipv6`` one family. Overridden DCs: the configured order; ``only-*`` drops IP
        literals of the other family (host names are kept: they resolve later). ``prefer_ip``
        is case-insensitive. An empty list means the DC is unknown (§5.3).
        Raises ValueError for an unknown ``prefer_ip`` value.
        """
        prefer = _normalise_prefer_ip(prefer_ip)

        override = self.overrides.get(dc)
        if override is not None:
            if prefer == "only-ipv4":
                return [(host, port) for host, port in override if _ip_version(host) != 6]
            if prefer == "only-ipv6":
                return [(host, port) for host, port in override if _ip_version(host) != 4]
            return list(override)

        shuffle = rng.shuffle if rng is not None else random.shuffle
        v4 = list(DC_ADDRESSES_V4.get(dc, ()))
        v6 = list(DC_ADDRESSES_V6.get(dc, ()))
        shuffle(v4)
        shuffle(v6)
        if prefer == "prefer-ipv6":
            hosts = v6 + v4
        elif prefer == "prefer-ipv4":
            hosts = v4 + v6
        elif prefer == "only-ipv4":
            hosts = v4
        else:
            hosts = v6
        return [(host, DC_PORT) for host in hosts]

    def known(self, dc: int, prefer_ip: str) -> bool:
        """True if :meth:`addresses` has at least one address for ``dc`` under ``prefer_ip``.

        Raises ValueError for an unknown ``prefer_ip`` value.
        """
        prefer = _normalise_prefer_ip(prefer_ip)
        override = self.overrides.get(dc)
        if override is not None:
            return bool(self.addresses(dc, prefer))
        v4 = bool(DC_ADDRESSES_V4.get(dc))
        v6 = bool(DC_ADDRESSES_V6.get(dc))
        if prefer == "only-ipv4":
            return v4
        if prefer == "only-ipv6":
            return v6
        return v4 or v6
