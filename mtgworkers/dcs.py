"""Telegram DC addresses and the order in which to try them (docs/protocol.md §5).

The built-in table is mtg's (§5.1): DCs 1-5 and 203, all on port 443. ``[dc-overrides]`` in the
config replace the built-in addresses of a DC, or add a DC the table does not know (test DCs
such as 10002, or everything pointed at 127.0.0.1 in tests).

With ``auto-update`` (§5.4) addresses learned at run time are published into the table's
:class:`AutoAddresses`; they are tried after the built-in ones of the same family.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mtgworkers.config.errors import ConfigError
from mtgworkers.config.scalars import PREFER_IP_VALUES, PreferIP, parse_prefer_ip

__all__ = [
    "DC_ADDRESSES_V4",
    "DC_ADDRESSES_V6",
    "DC_PORT",
    "PREFER_IP_VALUES",
    "AutoAddresses",
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


def _ip_version(host: str) -> int | None:
    """4 or 6 for an IP literal, None for a host name."""
    try:
        return ipaddress.ip_address(host.strip("[]")).version
    except ValueError:
        return None


def _normalise_prefer_ip(prefer_ip: PreferIP | str) -> PreferIP:
    if isinstance(prefer_ip, PreferIP):
        return prefer_ip
    try:
        return parse_prefer_ip(prefer_ip)
    except ConfigError:
        raise ValueError(
            f"unknown prefer-ip value {prefer_ip!r}: expected one of {', '.join(PREFER_IP_VALUES)}"
        ) from None


Addresses = tuple[tuple[str, int], ...]


class AutoAddresses:
    """DC addresses learned at run time (``auto-update``, §5.4), per address family.

    The one mutable part of a :class:`DCTable`: the updater replaces the whole list of a
    (family, DC) pair at once, and readers always see one complete list (everything runs
    on one event loop; a replace is a single assignment).
    """

    __slots__ = ("_v4", "_v6")

    def __init__(self) -> None:
        self._v4: dict[int, Addresses] = {}
        self._v6: dict[int, Addresses] = {}

    def replace(self, family: int, dc: int, addresses: Iterable[tuple[str, int]]) -> None:
        """Make ``addresses`` (``(host, port)`` pairs) the auto-updated list of ``dc`` for
        ``family`` (``socket.AF_INET`` or ``AF_INET6``); an empty iterable clears it.

        Raises ValueError for another family.
        """
        table = self._table(family)
        new = tuple((str(host), int(port)) for host, port in addresses)
        if new:
            table[dc] = new
        else:
            table.pop(dc, None)

    def get(self, family: int, dc: int) -> Addresses:
        """The auto-updated ``(host, port)`` pairs of ``dc`` for ``family`` (maybe empty).

        Raises ValueError for a family other than AF_INET/AF_INET6.
        """
        return self._table(family).get(dc, ())

    def _table(self, family: int) -> dict[int, Addresses]:
        if family == socket.AF_INET:
            return self._v4
        if family == socket.AF_INET6:
            return self._v6
        raise ValueError(f"unsupported address family {family!r}")

    def __repr__(self) -> str:
        return f"AutoAddresses(v4={self._v4!r}, v6={self._v6!r})"


@dataclass(frozen=True)
class DCTable:
    """Where each DC lives. ``overrides`` maps a DC number to ``(host, port)`` pairs that
    replace the built-in addresses of that DC (the config's ``[dc-overrides]``); ``auto``
    holds the addresses learned by ``auto-update`` (see :meth:`set_auto_addresses`)."""

    overrides: Mapping[int, tuple[tuple[str, int], ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    auto: AutoAddresses = field(default_factory=AutoAddresses, compare=False)

    def set_auto_addresses(
        self, dc: int, family: int, addresses: Iterable[tuple[str, int]]
    ) -> None:
        """Replace the auto-updated addresses of ``dc`` for ``family`` (``socket.AF_INET``
        or ``AF_INET6``) with ``addresses``; they are tried after the built-in addresses of
        that family. A DC listed in ``overrides`` ignores them.

        Raises ValueError for another family.
        """
        self.auto.replace(family, dc, addresses)

    def addresses(
        self, dc: int, prefer_ip: PreferIP | str, rng: random.Random | None = None
    ) -> list[tuple[str, int]]:
        """Addresses to try, in order, for DC number ``dc`` (positive, after the dc_number rule).

        Built-in addresses: each family shuffled (``rng``, default the ``random`` module) and
        followed by that family's auto-updated addresses, shuffled too; then ``prefer-ipv6``
        gives IPv6 before IPv4, ``prefer-ipv4`` the reverse, ``only-ipv4`` / ``only-ipv6``
        one family. Overridden DCs: the configured order; ``only-*`` drops IP
        literals of the other family (host names are kept: they resolve later). ``prefer_ip``
        is case-insensitive. An empty list means the DC is unknown (§5.3).
        Raises ValueError for an unknown ``prefer_ip`` value.
        """
        prefer = _normalise_prefer_ip(prefer_ip)

        override = self.overrides.get(dc)
        if override is not None:
            if prefer is PreferIP.ONLY_IPV4:
                return [(host, port) for host, port in override if _ip_version(host) != 6]
            if prefer is PreferIP.ONLY_IPV6:
                return [(host, port) for host, port in override if _ip_version(host) != 4]
            return list(override)

        shuffle = rng.shuffle if rng is not None else random.shuffle
        v4 = self._family(DC_ADDRESSES_V4.get(dc, ()), self.auto.get(socket.AF_INET, dc), shuffle)
        v6 = self._family(DC_ADDRESSES_V6.get(dc, ()), self.auto.get(socket.AF_INET6, dc), shuffle)
        if prefer is PreferIP.PREFER_IPV6:
            return v6 + v4
        if prefer is PreferIP.PREFER_IPV4:
            return v4 + v6
        if prefer is PreferIP.ONLY_IPV4:
            return v4
        return v6

    @staticmethod
    def _family(
        builtin: tuple[str, ...],
        auto: Addresses,
        shuffle: Callable[[list[tuple[str, int]]], None],
    ) -> list[tuple[str, int]]:
        first = [(host, DC_PORT) for host in builtin]
        shuffle(first)
        if not auto:
            return first
        seen = set(first)
        extra = [address for address in auto if address not in seen]
        shuffle(extra)
        return first + extra

    def known(self, dc: int, prefer_ip: PreferIP | str) -> bool:
        """True if :meth:`addresses` has at least one address for ``dc`` under ``prefer_ip``.

        Raises ValueError for an unknown ``prefer_ip`` value.
        """
        prefer = _normalise_prefer_ip(prefer_ip)
        override = self.overrides.get(dc)
        if override is not None:
            return bool(self.addresses(dc, prefer))
        v4 = bool(DC_ADDRESSES_V4.get(dc) or self.auto.get(socket.AF_INET, dc))
        v6 = bool(DC_ADDRESSES_V6.get(dc) or self.auto.get(socket.AF_INET6, dc))
        if prefer is PreferIP.ONLY_IPV4:
            return v4
        if prefer is PreferIP.ONLY_IPV6:
            return v6
        return v4 or v6
