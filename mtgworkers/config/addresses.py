"""Addresses: IP literals, ports, ``host:port``, CIDR networks, DC and NTP server addresses.

Each value kind has one parser here (mtg's ``TypeIP``, ``TypePort``, ``TypeHostPort``; ours
for the rest) that raises :class:`~mtgworkers.config.errors.ConfigError` with the reason:

- :func:`parse_ip`: an IPv4/IPv6 literal, canonical text (IPv4-mapped IPv6 -> IPv4);
- :func:`parse_port`: a TOML integer port 1..65535;
- :func:`parse_host_port` -> :class:`HostPort`: ``IP:port`` / ``[v6]:port`` (``bind-to``);
- :func:`parse_cidr`: a network in CIDR notation or one address (``proxy-protocol-trusted``);
- :func:`parse_dc_address`: ``[dc-overrides]`` ``host:port``, host an IP or a host name;
- :func:`parse_ntp_server` / :func:`format_ntp_server`: ``[doctor] ntp-servers`` entries.

``host:port`` text follows Go's ``net.SplitHostPort``; it is written back with
:func:`mtgworkers.netaddr.join_host_port`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mtgworkers.config.errors import ConfigError
from mtgworkers.defense.iplist import Network as IPNetwork
from mtgworkers.defense.iplist import _parse_entry as parse_network
from mtgworkers.netaddr import join_host_port

__all__ = [
    "NTP_PORT",
    "HostPort",
    "format_ntp_server",
    "parse_cidr",
    "parse_dc_address",
    "parse_host_port",
    "parse_ip",
    "parse_ntp_server",
    "parse_port",
]

NTP_PORT = 123


@dataclass(frozen=True)
class HostPort:
    """An IP literal and a port, e.g. ``bind-to``. ``str()`` gives ``host:port``/``[v6]:port``."""

    host: str
    port: int

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)


def parse_cidr(text: str) -> IPNetwork:
    """Parse an IP network in CIDR notation, or one address (a /32 or /128 network), with
    the rules of the IP list files (decimal prefix length, no zones). Raises ConfigError."""
    try:
        return parse_network(text)
    except ValueError:
        raise ConfigError(f"incorrect network {text!r}: expected an IP address or CIDR") from None


def parse_ip(text: str) -> str:
    """Parse an IPv4 or IPv6 literal; return its canonical text (IPv4-mapped IPv6 -> IPv4).

    No zones (``%eth0``), no brackets, no leading zeros in IPv4. Raises ConfigError.
    """
    address = _ip_or_none(text)
    if address is None:
        raise ConfigError(f"incorrect ip {text}")
    return address


def _ip_or_none(text: str) -> str | None:
    if "%" in text:  # Python accepts scoped IPv6 addresses, Go's net.ParseIP does not
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # Go keeps IPv4 as IPv4-mapped IPv6 internally; both spellings mean the same host.
        return str(address.ipv4_mapped)
    return str(address)


def parse_port(value: int) -> int:
    """Check a TOML integer port: 1..65535 (the caller treats 0 as "use the default")."""
    if not 1 <= value <= 65535:
        raise ConfigError(f"incorrect port number ({value})")
    return value


def parse_host_port(text: str) -> HostPort:
    """Parse ``IP:port`` / ``[IPv6]:port`` (host names rejected, port 1..65535)."""
    host, port = _split_host_port(text)
    if not host:
        raise ConfigError(f"empty host: {text}")
    address = _ip_or_none(host)
    if address is None:
        raise ConfigError(f"host is not an IP address: {text}")
    return HostPort(address, port)


def parse_dc_address(text: str) -> tuple[str, int]:
    """Parse a ``[dc-overrides]`` address: ``host:port``, host an IP literal or a host name."""
    host, port = _split_host_port(text)
    if not host:
        raise ConfigError(f"empty host: {text}")
    return _host_or_ip(host, text), port


def _split_host_port(text: str) -> tuple[str, int]:
    # Same rules as Go's net.SplitHostPort, then a decimal port 1..65535.
    colon = text.rfind(":")
    if colon < 0:
        raise ConfigError(f"missing port in address: {text}")
    host_start, host_end = 0, colon
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ConfigError(f"missing ']' in address: {text}")
        if close + 1 == len(text):
            raise ConfigError(f"missing port in address: {text}")
        if close + 1 != colon:
            if text[close + 1] == ":":
                raise ConfigError(f"too many colons in address: {text}")
            raise ConfigError(f"missing port in address: {text}")
        host_start, host_end = 1, close
    elif ":" in text[:colon]:
        raise ConfigError(f"too many colons in address: {text}")
    after_host = host_end + 1 if host_start else 0
    if "[" in text[host_start:] or "]" in text[after_host:]:
        raise ConfigError(f"unexpected bracket in address: {text}")
    return text[host_start:host_end], _port_from_text(text[colon + 1 :], text)


_PORT_RE = re.compile(r"[0-9]+")


def _port_from_text(port: str, context: str) -> int:
    # Decimal digits only (Go's ParseUint: no sign, no spaces); leading zeros are fine.
    significant = port.lstrip("0")
    if (
        not _PORT_RE.fullmatch(port)
        or len(significant) > 5
        or not 1 <= int(significant or "0") <= 65535
    ):
        raise ConfigError(f"incorrect port number ({context})")
    return int(significant)


_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _host_or_ip(host: str, context: str) -> str:
    """Return the canonical IP or the host name; a name must look like a DNS name."""
    address = _ip_or_none(host)
    if address is not None:
        return address
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if (
        not name
        or len(name) > 253
        or not all(_LABEL_RE.fullmatch(label) for label in labels)
        # An all-numeric last label is a mistyped IP, not a name (resolvers may read it as one).
        or labels[-1].isdigit()
    ):
        raise ConfigError(f"host is neither an IP address nor a valid host name: {context}")
    return host


def parse_ntp_server(text: str) -> tuple[str, int]:
    """Parse a ``[doctor] ntp-servers`` entry: ``host``, ``host:port`` or ``[v6]:port``.

    The host is an IP literal or a host name; the port defaults to 123. Returns
    ``(host, port)``. Raises ConfigError.
    """
    bracketed = text.startswith("[") and text.endswith("]")
    bare = _ip_or_none(text[1:-1] if bracketed else text)
    if bare is not None:
        return bare, NTP_PORT
    if text.startswith("[") or ":" in text:
        host, port = _split_host_port(text)
    else:
        host, port = text, NTP_PORT
    if not host:
        raise ConfigError(f"empty host: {text}")
    return _host_or_ip(host, text), port


def format_ntp_server(server: tuple[str, int]) -> str:
    """``("time.example", 123)`` -> ``"time.example"``; other ports as ``host:port``."""
    host, port = server
    if port == NTP_PORT:
        return host
    return join_host_port(host, port)
