"""PROXY protocol v1/v2 headers (docs/protocol.md §10).

:func:`parse_header` reads the optional header a load balancer puts at the start of an
accepted connection. It is incremental: call it with everything received so far and it
answers "need more" (``None``), "this connection has no PROXY header" (:data:`NOT_PROXY`, the
bytes belong to the client), or ``(header, consumed)``. The NOT_PROXY decision is taken on the
first byte that cannot continue either signature, so a TLS client (first byte ``0x16``) is
recognised at once and never waits for more data.

:func:`build_v2` writes the binary v2 header we send to the fronting host.

Formats: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Final, Literal

from mtgworkers.protocol.errors import ProtocolError

__all__ = [
    "NOT_PROXY",
    "V1_MAX_LEN",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "build_v2",
    "parse_header",
]

V1_SIGNATURE: Final = b"PROXY "
V1_MAX_LEN: Final = 107  # whole line including CRLF
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED_LEN = 16  # signature, ver_cmd, family, u16be length

_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_ADDR_LEN = {_AF_INET: 12, _AF_INET6: 36}
_FAM_TCP4 = 0x11
_FAM_TCP6 = 0x21

# What may appear in a v1 line before CRLF: printable ASCII only.
_V1_PRINTABLE = frozenset(range(0x20, 0x7F))


class ProxyProtocolError(ProtocolError):
    """A PROXY header was started but is malformed."""


class _NotProxy(enum.Enum):
    NOT_PROXY = "NOT_PROXY"

    def __repr__(self) -> str:
        return "NOT_PROXY"


NOT_PROXY: Final = _NotProxy.NOT_PROXY
"""Returned by :func:`parse_header` when the stream does not start with a PROXY header."""


@dataclass(frozen=True)
class ProxyHeader:
    """Addresses announced by the header.

    ``src``/``dst`` are ``(ip, port)`` with the IP in Python's canonical text form, or ``None``
    for v1 ``UNKNOWN``, v2 ``LOCAL`` and v2 families without IP addresses (unix, unspecified):
    then the socket's own peer address is the client address.

    ``local`` is True for v2 ``LOCAL`` (the balancer's own connection, e.g. a health check)
    and v1 ``UNKNOWN`` (the balancer does not know the client): no client is behind it.
    """

    src: tuple[str, int] | None
    dst: tuple[str, int] | None
    local: bool = False


ParseResult = tuple[ProxyHeader, int] | Literal[_NotProxy.NOT_PROXY] | None

_LOCAL = ProxyHeader(src=None, dst=None, local=True)
_NO_ADDRESSES = ProxyHeader(src=None, dst=None)


def parse_header(buf: bytes | bytearray | memoryview) -> ParseResult:
    """Look for a PROXY v1 or v2 header at the start of ``buf``.

    Returns ``None`` if more bytes are needed to decide, :data:`NOT_PROXY` if ``buf`` cannot
    start with a header (nothing is consumed then), or ``(header, consumed)`` where
    ``consumed`` is the header length; bytes after it are client data.
    Raises :class:`ProxyProtocolError` if a header signature was seen but the rest is invalid.
    """
    data = bytes(buf[:V1_MAX_LEN])
    if not data:
        return None
    if data[0] == V1_SIGNATURE[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        head = bytes(buf[:_V2_FIXED_LEN])
        if not V2_SIGNATURE.startswith(head[: len(V2_SIGNATURE)]):
            return NOT_PROXY
        if len(head) < _V2_FIXED_LEN:
            return None
        return _parse_v2(buf, head)
    return NOT_PROXY


def _parse_v1(data: bytes) -> ParseResult:
    if not data.startswith(V1_SIGNATURE):
        return NOT_PROXY if not V1_SIGNATURE.startswith(data[: len(V1_SIGNATURE)]) else None

    end = data.find(b"\r\n")
    if end < 0:
        line = data.removesuffix(b"\r")
        if not _V1_PRINTABLE.issuperset(line):
            raise ProxyProtocolError("PROXY v1 header contains a non-printable byte")
        if len(data) >= V1_MAX_LEN:
            raise ProxyProtocolError(f"PROXY v1 header is longer than {V1_MAX_LEN} bytes")
        return None

    line = data[:end]
    if not _V1_PRINTABLE.issuperset(line):
        raise ProxyProtocolError("PROXY v1 header contains a non-printable byte")
    parts = line.decode("ascii").split(" ")
    consumed = end + 2

    if parts[1] == "UNKNOWN":
        # The receiver must ignore everything after UNKNOWN.
        return _LOCAL, consumed
    if parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"PROXY v1: unsupported protocol {parts[1]!r}")
    if len(parts) != 6:
        raise ProxyProtocolError("PROXY v1: expected '<proto> <src> <dst> <sport> <dport>'")

    version = 4 if parts[1] == "TCP4" else 6
    src_ip = _v1_address(parts[2], version)
    dst_ip = _v1_address(parts[3], version)
    src_port = _v1_port(parts[4])
    dst_port = _v1_port(parts[5])
    return ProxyHeader(src=(src_ip, src_port), dst=(dst_ip, dst_port)), consumed


def _v1_address(text: str, version: int) -> str:
    # ipaddress accepts IPv6 scope ids ("fe80::1%eth0"); a PROXY header never carries one.
    if "%" in text:
        raise ProxyProtocolError(f"PROXY v1: invalid IPv{version} address {text!r}")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"PROXY v1: invalid IPv{version} address {text!r}") from None
    if address.version != version:
        raise ProxyProtocolError(f"PROXY v1: invalid IPv{version} address {text!r}")
    return str(address)


def _v1_port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5):
        raise ProxyProtocolError(f"PROXY v1: invalid port {text!r}")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyProtocolError(f"PROXY v1: invalid port {text!r}")
    return port


def _parse_v2(buf: bytes | bytearray | memoryview, head: bytes) -> ParseResult:
    ver_cmd, family = head[12], head[13]
    length = int.from_bytes(head[14:16], "big")
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2: unsupported version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyProtocolError(f"PROXY v2: unsupported command {command}")
    address_family, transport = family >> 4, family & 0x0F
    if address_family > _AF_UNIX or transport > 2:
        raise ProxyProtocolError(f"PROXY v2: unsupported address family 0x{family:02x}")

    needed = _ADDR_LEN.get(address_family, 0)
    if command == _CMD_PROXY and length < needed:
        raise ProxyProtocolError(
            f"PROXY v2: address block of {length} bytes is too short for family 0x{family:02x}"
        )

    consumed = _V2_FIXED_LEN + length
    if len(buf) < consumed:
        return None
    if command == _CMD_LOCAL:
        return _LOCAL, consumed
    if needed == 0:
        return _NO_ADDRESSES, consumed

    # TLVs after the addresses are skipped: nothing in them matters to us.
    block = bytes(buf[_V2_FIXED_LEN : _V2_FIXED_LEN + needed])
    ip_len = (needed - 4) // 2
    src_ip = ipaddress.ip_address(block[:ip_len])
    dst_ip = ipaddress.ip_address(block[ip_len : 2 * ip_len])
    src_port = int.from_bytes(block[2 * ip_len : 2 * ip_len + 2], "big")
    dst_port = int.from_bytes(block[2 * ip_len + 2 :], "big")
    return ProxyHeader(src=(str(src_ip), src_port), dst=(str(dst_ip), dst_port)), consumed


def build_v2(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """Build a PROXY v2 header, command PROXY over TCP, no TLVs (§10.2).

    ``src`` is the client's ``(ip, port)``, ``dst`` the fronting server's. Both IPv4 -> family
    TCP/IPv4; otherwise both addresses are written as IPv6, an IPv4 one as IPv4-mapped
    (``::ffff:a.b.c.d``). Raises :class:`ProxyProtocolError` on an invalid IP or port.
    """
    src_ip, src_port = _build_endpoint(src)
    dst_ip, dst_port = _build_endpoint(dst)
    if src_ip.version == 4 and dst_ip.version == 4:
        family = _FAM_TCP4
        addresses = src_ip.packed + dst_ip.packed
    else:
        family = _FAM_TCP6
        addresses = _as_ipv6(src_ip) + _as_ipv6(dst_ip)
    block = addresses + src_port.to_bytes(2, "big") + dst_port.to_bytes(2, "big")
    return V2_SIGNATURE + bytes((0x20 | _CMD_PROXY, family)) + len(block).to_bytes(2, "big") + block


def _build_endpoint(
    endpoint: tuple[str, int],
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    host, port = endpoint
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ProxyProtocolError(f"not an IP address: {host!r}") from None
    if not 0 <= port <= 0xFFFF:
        raise ProxyProtocolError(f"invalid port: {port}")
    return ip, port


def _as_ipv6(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    if ip.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed
