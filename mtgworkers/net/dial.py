"""Outgoing TCP connections: direct, or through SOCKS5 proxies (docs/protocol.md §11, §13).

:class:`Dialer` hands out connected, non-blocking sockets with our socket
options set, ready for ``loop.create_connection(factory, sock=sock)``:

- a host name is resolved with the configured resolver and its addresses are
  tried one after the other (no "happy eyeballs", like mtg);
- each TCP connect is bounded by ``network.timeout.tcp`` (None: the OS limit);
- with ``[network].proxies`` (and ``use_proxies``) the proxies are shuffled for
  every dial and tried in that order until one works, as ``mtg run`` does; the
  proxy itself is reached directly, and the target is handed to it unresolved
  (IP literal as IPv4/IPv6, anything else as a domain name);
- whatever fails, the socket is closed and a :class:`DialError` names the
  address and the reason. Passwords of proxies never appear in messages.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import socket
from collections.abc import Awaitable
from contextlib import suppress
from typing import TYPE_CHECKING

from mtgworkers.net.dns import ResolveError
from mtgworkers.netaddr import join_host_port
from mtgworkers.protocol.socks5 import ClientHandshake, Socks5Error

if TYPE_CHECKING:
    from mtgworkers.config import Network, ProxyURL
    from mtgworkers.net.dns import Resolver

__all__ = ["SOCKS_HANDSHAKE_TIMEOUT", "DialError", "Dialer"]

# Bound on a SOCKS5 exchange when network.timeout.tcp is unset: a proxy that
# accepts and then never answers must not hold a dial forever.
SOCKS_HANDSHAKE_TIMEOUT = 30.0

# Go's defaults for a zero keep-alive setting (mtg relies on them).
_DEFAULT_KEEPALIVE_IDLE = 15.0
_DEFAULT_KEEPALIVE_INTERVAL = 15.0
_DEFAULT_KEEPALIVE_COUNT = 9

# Not every platform has these (TCP_KEEPIDLE is TCP_KEEPALIVE on macOS).
_TCP_KEEPIDLE = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))
_TCP_KEEPINTVL = getattr(socket, "TCP_KEEPINTVL", None)
_TCP_KEEPCNT = getattr(socket, "TCP_KEEPCNT", None)
_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)


class DialError(OSError):
    """No connection could be made; ``str()`` names the address(es) and the reason(s)."""


def _proxy_label(proxy: ProxyURL) -> str:
    # Built here rather than str(proxy): never any credentials, whatever the object.
    return f"{proxy.scheme}://{join_host_port(proxy.host, proxy.port)}"


def _reason(exc: BaseException, timeout: float | None = None) -> str:
    """Short text for why one attempt failed."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) and not exc.args:
        return f"timeout after {timeout:g}s" if timeout is not None else "timeout"
    if isinstance(exc, OSError) and (exc.errno or exc.strerror):
        # The loops word strerror differently ("Connect call failed (...)"); errno is clear.
        text = os.strerror(exc.errno) if exc.errno else str(exc.strerror)
        return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__


def _joined(errors: list[str]) -> DialError:
    if len(errors) == 1:
        return DialError(errors[0])
    return DialError("cannot dial to any address: " + "; ".join(errors))


async def _bounded(awaitable: Awaitable[None], timeout: float | None) -> None:
    if timeout is None:
        await awaitable
    else:
        await asyncio.wait_for(awaitable, timeout)


class Dialer:
    """Opens outgoing TCP connections per ``[network]`` (proxies, timeouts, keep-alive)."""

    def __init__(
        self,
        network_cfg: Network,
        resolver: Resolver,
        *,
        rng: random.Random | None = None,
    ) -> None:
        """``network_cfg``: the parsed ``[network]`` section; ``resolver``: for host names
        (targets dialled directly and proxy hosts); ``rng``: shuffles proxies (tests).
        """
        self._cfg = network_cfg
        self._resolver = resolver
        self._rng = rng or random.Random()
        self._tcp_timeout = network_cfg.timeout.tcp
        keep_alive = network_cfg.keep_alive
        self._keepalive = not keep_alive.disabled
        idle = keep_alive.idle or _DEFAULT_KEEPALIVE_IDLE
        interval = keep_alive.interval or _DEFAULT_KEEPALIVE_INTERVAL
        count = keep_alive.count or _DEFAULT_KEEPALIVE_COUNT
        # Whole seconds, rounded up (as Go does); the kernel wants at least 1.
        self._keepidle = max(1, math.ceil(idle))
        self._keepintvl = max(1, math.ceil(interval))
        self._keepcnt = count
        # mtg: TCP_USER_TIMEOUT = idle + interval * count, set even without keep-alive,
        # so that unacknowledged data and keep-alive give up at the same time.
        self._user_timeout_ms = int((idle + interval * count) * 1000)

    async def open_socket(self, host: str, port: int, *, use_proxies: bool = True) -> socket.socket:
        """A connected, non-blocking TCP socket to ``host:port``.

        Through the configured SOCKS5 proxies when ``use_proxies`` and there are
        any (shuffled per dial, the first that works wins), else directly.
        Raises DialError (an OSError) when no connection could be made; with
        several attempts the message is "cannot dial to any address: " followed
        by every attempt's error.
        """
        proxies = list(self._cfg.proxies) if use_proxies else []
        if not proxies:
            return await self._dial_direct(host, port)
        if len(proxies) > 1:
            self._rng.shuffle(proxies)
        errors: list[str] = []
        for proxy in proxies:
            try:
                return await self._dial_via(proxy, host, port)
            except DialError as exc:
                errors.append(str(exc))
        raise _joined(errors)

    async def _dial_direct(self, host: str, port: int) -> socket.socket:
        try:
            addresses = await self._resolver.resolve(host)
        except ResolveError as exc:
            raise DialError(f"cannot dial to {join_host_port(host, port)}: {exc}") from None
        if not addresses:
            raise DialError(f"cannot dial to {join_host_port(host, port)}: no addresses")
        errors: list[str] = []
        for address in addresses:
            try:
                return await self._connect(address, port)
            except (OSError, asyncio.TimeoutError) as exc:
                target = join_host_port(address, port)
                if address != host:
                    target += f" ({host})"
                errors.append(f"cannot dial to {target}: {_reason(exc, self._tcp_timeout)}")
        raise _joined(errors)

    async def _connect(self, address: str, port: int) -> socket.socket:
        """Connect a new socket to an IP literal (already resolved)."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            self._set_options(sock)
            await _bounded(_connect_ip(sock, (address, port)), self._tcp_timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    def _set_options(self, sock: socket.socket) -> None:
        # Small MTProto packets must not wait for Nagle.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if self._keepalive else 0)
        if self._keepalive:
            for option, value in (
                (_TCP_KEEPIDLE, self._keepidle),
                (_TCP_KEEPINTVL, self._keepintvl),
                (_TCP_KEEPCNT, self._keepcnt),
            ):
                if option is not None:
                    with suppress(OSError):  # best effort, like mtg
                        sock.setsockopt(socket.IPPROTO_TCP, option, value)
        if _TCP_USER_TIMEOUT is not None:
            with suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, self._user_timeout_ms)

    async def _dial_via(self, proxy: ProxyURL, host: str, port: int) -> socket.socket:
        prefix = f"cannot dial to {join_host_port(host, port)} via {_proxy_label(proxy)}"
        try:
            sock = await self._dial_direct(proxy.host, proxy.port)
        except DialError as exc:
            raise DialError(f"{prefix}: {exc}") from None
        timeout = self._tcp_timeout if self._tcp_timeout is not None else SOCKS_HANDSHAKE_TIMEOUT
        try:
            await asyncio.wait_for(self._socks_handshake(sock, proxy, host, port), timeout)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, (OSError, EOFError, Socks5Error, asyncio.TimeoutError)):
                reason = _reason(exc, timeout)
                raise DialError(f"{prefix}: SOCKS5 handshake failed: {reason}") from None
            raise
        return sock

    @staticmethod
    async def _socks_handshake(sock: socket.socket, proxy: ProxyURL, host: str, port: int) -> None:
        username = proxy.username
        if username is None and proxy.password is not None:
            username = ""  # rejected by the handshake: RFC 1929 needs a user name
        exchange = ClientHandshake(host, port, username, proxy.password)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, exchange.start())
        while not exchange.done:
            # Never more than the current message: bytes after the reply belong to the caller.
            data = await loop.sock_recv(sock, exchange.bytes_needed)
            if not data:
                raise EOFError("SOCKS5 server closed the connection")
            answer = exchange.feed(data)
            if answer:
                await loop.sock_sendall(sock, answer)


async def _connect_ip(sock: socket.socket, address: tuple[str, int]) -> None:
    """Non-blocking connect of ``sock`` to an IP literal address.

    uvloop's ``sock_connect`` sends every address, even an IP literal, through libuv's
    getaddrinfo thread pool; waking that thread cost ~20 % of a proxy handshake. Here
    the socket is connected directly and the loop only waits for it to become writable.
    """
    try:
        sock.connect(address)
        return
    except BlockingIOError:
        pass
    loop = asyncio.get_running_loop()
    writable: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not writable.done():
            writable.set_result(None)

    loop.add_writer(fd, ready)
    try:
        await writable
    finally:
        loop.remove_writer(fd)
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))
