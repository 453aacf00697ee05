"""Learning the fronting site's ServerHello shape (the I/O around ``protocol.serverhello``).

:func:`learn_shape` connects to the fronting site a few times, sends Telegram-like
ClientHellos with the secret's host as SNI and the TLS 1.3 suites in the orders of
``serverhello.PROBE_ORDERS``, reads each ServerHello and returns the encoded shape for
``SharedState.set_shape`` (None when nothing could be learned; the reason is logged as
mtg's doppelganger does, ``cannot learn`` at warn, logger ``proxy.doppelganger``).

:class:`ShapeReader` is what a worker hands to ``ServerHandshake(shape=...)``: it reads the
stored blob on every call and decodes it only when it changed. Nothing on a client's path
ever waits for the site: the learner runs in the background and workers read memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence

from mtgworkers.net.dial import DialError
from mtgworkers.netaddr import join_host_port
from mtgworkers.protocol import proxyproto
from mtgworkers.protocol.serverhello import (
    GROUP_X25519,
    PROBE_ORDERS,
    ServerHello,
    ServerHelloError,
    Shape,
    decode_shape,
    encode_shape,
    parse_server_hello,
    probe_client_hello,
    shape_from_answers,
)

__all__ = ["DEFAULT_TIMEOUT", "ShapeReader", "ask_server_hello", "learn_shape", "x25519_share"]

DEFAULT_TIMEOUT = 10.0
_READ = 16384
_log = logging.getLogger("mtgworkers.proxy.doppelganger")

OpenSocket = Callable[[str, int], Awaitable[socket.socket]]


def x25519_share(urandom: Callable[[int], bytes] = os.urandom) -> bytes:
    """A fresh X25519 public key (32 bytes)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    private = X25519PrivateKey.from_private_bytes(urandom(32))
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


async def ask_server_hello(sock: socket.socket, hello: bytes) -> tuple[ServerHello, bytes]:
    """Send ``hello`` on the connected non-blocking ``sock`` and read until the answer's
    ServerHello is complete. Returns it and every byte read so far (records after it may
    have come along). Raises ServerHelloError (also when the site closes first) or
    OSError; the caller bounds the time."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, hello)
    data = bytearray()
    while True:
        chunk = await loop.sock_recv(sock, _READ)
        if not chunk:
            what = f"after {len(data)} bytes" if data else "without an answer"
            raise ServerHelloError(f"the site closed the connection {what}")
        data += chunk
        parsed = parse_server_hello(data)
        if parsed is not None:
            return parsed[0], bytes(data)


async def _probe(
    host: str,
    port: int,
    open_socket: OpenSocket,
    sni: str,
    suites: Sequence[int],
    proxy_protocol: bool,
    urandom: Callable[[int], bytes],
) -> tuple[Sequence[int], bytes, ServerHello]:
    session_id = urandom(32)
    hello = probe_client_hello(
        sni,
        random=urandom(32),
        session_id=session_id,
        key_shares=[(GROUP_X25519, x25519_share(urandom))],
        suites=suites,
    )
    sock = await open_socket(host, port)
    try:
        if proxy_protocol:
            local, peer = sock.getsockname(), sock.getpeername()
            header = proxyproto.build_v2((local[0], local[1]), (peer[0], peer[1]))
            await asyncio.get_running_loop().sock_sendall(sock, header)
        answer, _ = await ask_server_hello(sock, hello)
    finally:
        sock.close()
    return suites, session_id, answer


async def learn_shape(
    host: str,
    port: int,
    open_socket: OpenSocket,
    *,
    sni: str,
    timeout: float = DEFAULT_TIMEOUT,
    proxy_protocol: bool = False,
    urandom: Callable[[int], bytes] = os.urandom,
) -> bytes | None:
    """Learn how the fronting site at ``host:port`` answers a Telegram-like ClientHello.

    ``open_socket(host, port)`` returns a connected non-blocking TCP socket (e.g.
    ``functools.partial(dialer.open_socket, use_proxies=False)``); ``sni`` is the
    secret's host; ``proxy_protocol``: send a PROXY v2 header first, as fronted
    connections do with ``[domain-fronting] proxy-protocol``. One connection per entry
    of ``PROBE_ORDERS``, one after the other, all within ``timeout`` seconds.

    Returns the encoded shape (at most ``SharedState.SHAPE_MAX`` bytes) for
    ``SharedState.set_shape(blob, now)``, or None (logged: ``cannot learn``, warn) when
    the site is unreachable, slow, not TLS 1.3, or answers in a way that cannot be copied.
    Never raises for the site's faults.
    """
    address = join_host_port(host, port)

    async def run() -> Shape:
        answers = []
        for suites in PROBE_ORDERS:
            answers.append(
                await _probe(host, port, open_socket, sni, suites, proxy_protocol, urandom)
            )
        return shape_from_answers(answers)

    try:
        shape = await asyncio.wait_for(run(), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        _cannot_learn(address, f"no ServerHello within {timeout:g}s")
        return None
    except ServerHelloError as exc:
        _cannot_learn(address, str(exc))
        return None
    except OSError as exc:
        _cannot_learn(address, _os_reason(exc))
        return None
    _log.debug(
        "learned the fronting site's server hello",
        extra={"address": address, "shape": shape.describe()},
    )
    return encode_shape(shape)


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, DialError):
        return str(exc)  # names the address and the reason
    if exc.errno:
        text = os.strerror(exc.errno)
        return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__


def _cannot_learn(address: str, reason: str) -> None:
    _log.warning(
        "cannot learn",
        extra={"what": "server hello shape", "address": address, "error": reason},
    )


class ShapeReader:
    """``ServerHandshake(shape=ShapeReader(state.shape))``: the decoded stored shape.

    ``read()`` returns ``(blob, learned_at)`` as ``SharedState.shape`` does. The blob is
    decoded only when it changed; an empty or undecodable blob gives None (today's
    answer), the latter logged once per blob.
    """

    __slots__ = ("_blob", "_read", "_shape")

    def __init__(self, read: Callable[[], tuple[bytes, float]]) -> None:
        self._read = read
        self._blob = b""
        self._shape: Shape | None = None

    def __call__(self) -> Shape | None:
        blob, _ = self._read()
        if blob != self._blob:
            self._blob = blob
            self._shape = None
            if blob:
                try:
                    self._shape = decode_shape(blob)
                except ServerHelloError as exc:
                    _log.warning(
                        "cannot use the stored server hello shape", extra={"error": str(exc)}
                    )
        return self._shape
