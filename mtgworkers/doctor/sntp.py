"""A small SNTP client (RFC 4330) for doctor's clock check.

:func:`build_request` and :func:`parse_response` are pure (time is a parameter);
:func:`query` does the UDP exchange with retries. The clock offset is the usual
``((T2 - T1) + (T3 - T4)) / 2``: positive when the server's clock is ahead of ours.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SNTPError", "SNTPResult", "build_request", "parse_response", "query"]

PACKET_LEN = 48
NTP_EPOCH_OFFSET = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01
_MODE_CLIENT = 3
_MODE_SERVER = 4
_VERSION = 4
_PACKET = struct.Struct(">BBbb II 4s QQQQ")


class SNTPError(Exception):
    """The server's answer is unusable (not a reply to us, kiss-of-death, unsynchronised)."""


@dataclass(frozen=True)
class SNTPResult:
    """Clock ``offset`` (server minus local) and round-trip ``delay``, in seconds."""

    offset: float
    delay: float
    stratum: int


def _to_ntp(unix: float) -> int:
    seconds = unix + NTP_EPOCH_OFFSET
    whole = int(seconds)
    return (whole << 32) | int((seconds - whole) * (1 << 32))


def _from_ntp(value: int) -> float:
    return (value >> 32) - NTP_EPOCH_OFFSET + (value & 0xFFFFFFFF) / (1 << 32)


def build_request(now: float, urandom: Callable[[int], bytes] = os.urandom) -> tuple[bytes, int]:
    """A client request sent at Unix time ``now``.

    Returns ``(packet, transmit)``: the 48 bytes to send and the 64-bit transmit
    timestamp the server must echo as its originate timestamp. The low bits of the
    timestamp are random (RFC 4330 §3 suggests it) so a stale or forged answer does not
    match.
    """
    transmit = (_to_ntp(now) & ~0xFFFF) | int.from_bytes(urandom(2), "big")
    first = (_VERSION << 3) | _MODE_CLIENT  # leap indicator 0
    packet = _PACKET.pack(first, 0, 0, 0, 0, 0, b"\x00" * 4, 0, 0, 0, transmit)
    return packet, transmit


def parse_response(data: bytes, transmit: int, received_at: float) -> SNTPResult:
    """Read a server reply to the request with timestamp ``transmit``.

    ``transmit`` (from :func:`build_request`) is also T1, our sending time; ``received_at``
    is our Unix time when the reply arrived (T4).
    Raises SNTPError when the reply is short, not a server reply, answers another request,
    is a kiss-of-death (stratum 0) or comes from an unsynchronised server.
    """
    if len(data) < PACKET_LEN:
        raise SNTPError(f"short reply: {len(data)} bytes")
    first, stratum, _poll, _precision, _delay, _disp, refid, _ref, origin, receive, tx = (
        _PACKET.unpack_from(data)
    )
    leap, mode = first >> 6, first & 0x07
    if mode != _MODE_SERVER:
        raise SNTPError(f"not a server reply (mode {mode})")
    if origin != transmit:
        raise SNTPError("reply does not answer our request")
    if stratum == 0:
        code = refid.decode("ascii", "replace").strip("\x00")
        raise SNTPError(f"kiss-of-death from server: {code or 'unknown'}")
    if leap == 3 or stratum > 15:
        raise SNTPError("server clock is not synchronised")
    if receive == 0 or tx == 0:
        raise SNTPError("reply without timestamps")
    # The random low bits of T1 are below 16 µs: far below what this check resolves.
    t1, t4 = _from_ntp(transmit), received_at
    t2, t3 = _from_ntp(receive), _from_ntp(tx)
    offset = ((t2 - t1) + (t3 - t4)) / 2
    delay = (t4 - t1) - (t3 - t2)
    return SNTPResult(offset=offset, delay=max(delay, 0.0), stratum=stratum)


class _Exchange(asyncio.DatagramProtocol):
    def __init__(self, transmit: int, clock: Callable[[], float]) -> None:
        self.transmit = transmit
        self.clock = clock
        self.done: asyncio.Future[SNTPResult] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        received_at = self.clock()
        if self.done.done():
            return
        try:
            result = parse_response(data, self.transmit, received_at)
        except SNTPError as exc:
            if "does not answer" in str(exc):
                return  # a late answer to an earlier attempt: keep waiting
            self.done.set_exception(exc)
            return
        self.done.set_result(result)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


def _returning(exchange: _Exchange) -> Callable[[], _Exchange]:
    return lambda: exchange


async def query(
    address: str,
    port: int = 123,
    *,
    timeout: float = 5.0,
    attempts: int = 3,
    clock: Callable[[], float] | None = None,
) -> SNTPResult:
    """Ask the NTP server at ``address`` (an IP literal) for the clock offset.

    Up to ``attempts`` requests, each waiting ``timeout / attempts`` seconds for its
    answer (UDP loses datagrams). ``clock`` returns Unix time (default ``time.time``).
    Raises SNTPError, OSError (e.g. connection refused: ICMP port unreachable) or
    TimeoutError ("no answer after N attempts") when no attempt gave a usable answer.
    """
    now = clock or time.time
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    per_attempt = max(timeout / max(attempts, 1), 0.05)
    last: BaseException | None = None
    for _ in range(max(attempts, 1)):
        packet, transmit = build_request(now())
        exchange = _Exchange(transmit, now)
        transport, _ = await loop.create_datagram_endpoint(
            _returning(exchange), remote_addr=(address, port), family=family
        )
        try:
            transport.sendto(packet)
            return await asyncio.wait_for(asyncio.shield(exchange.done), per_attempt)
        except asyncio.TimeoutError:
            last = None
        except (OSError, SNTPError) as exc:
            last = exc
            if isinstance(exc, SNTPError):
                raise
        finally:
            transport.close()
    if last is not None:
        raise last
    raise TimeoutError(f"no answer after {attempts} attempts")
