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

:meth:`Dialer.connect` gives a connected transport instead of a socket (the per-client
dials: Telegram DCs and the fronting host); see it for why it is the cheaper path.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import random
import socket
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import TYPE_CHECKING, TypeVar

from mtgworkers.net.dns import ResolveError
from mtgworkers.netaddr import join_host_port
from mtgworkers.protocol.socks5 import ClientHandshake, Socks5Error

if TYPE_CHECKING:
    from mtgworkers.config import Network, ProxyURL
    from mtgworkers.net.dns import Resolver

__all__ = ["SOCKS_HANDSHAKE_TIMEOUT", "DialError", "Dialer"]

_P = TypeVar("_P", bound=asyncio.BaseProtocol)

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
_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+


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
        # (level, option, value) set on every dialled socket after TCP_NODELAY
        options: list[tuple[int, int, int]] = [
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if self._keepalive else 0)
        ]
        if self._keepalive:
            for option, value in (
                (_TCP_KEEPIDLE, self._keepidle),
                (_TCP_KEEPINTVL, self._keepintvl),
                (_TCP_KEEPCNT, self._keepcnt),
            ):
                if option is not None:
                    options.append((socket.IPPROTO_TCP, option, value))
        if _TCP_USER_TIMEOUT is not None:
            options.append((socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, self._user_timeout_ms))
        self._options = tuple(options)
        # host -> its IP literal (without brackets), or None for a name: the DC table and
        # the fronting host are a handful of strings, asked once per client
        self._literals: dict[str, str | None] = {}

    async def connect(
        self,
        host: str,
        port: int,
        protocol_factory: Callable[[], _P],
        *,
        use_proxies: bool = True,
    ) -> asyncio.Transport:
        """A transport connected to ``host:port`` whose protocol ``protocol_factory`` made.

        The same dial as :meth:`open_socket` (addresses in order, proxies, timeouts,
        socket options, the same :class:`DialError` messages), but a direct dial lets
        the event loop make and connect the socket itself (``create_connection`` with
        an IP literal: uvloop neither resolves it nor needs a Python socket object).
        That saves per dial the Python socket, a non-blocking ioctl, an epoll add and
        delete for the writability wait, SO_ERROR and a second TCP_NODELAY: about 12 us
        of the ~56 us of a loopback dial on the benchmark host (a bench ``handshakes``
        connection makes one). ``protocol_factory`` is called once per attempt.
        Raises DialError.
        """
        loop = asyncio.get_running_loop()
        if use_proxies and self._cfg.proxies:
            sock = await self.open_socket(host, port, use_proxies=use_proxies)
            try:
                transport, _ = await loop.create_connection(protocol_factory, sock=sock)
            except OSError as exc:
                sock.close()
                raise DialError(
                    f"cannot dial to {join_host_port(host, port)}: {_reason(exc)}"
                ) from None
            return transport
        literal = self._literal(host)
        addresses = [literal] if literal is not None else await self._addresses(host, port)
        errors: list[str] = []
        timeout = self._tcp_timeout
        for address in addresses:
            try:
                if timeout is None:
                    transport, _ = await loop.create_connection(protocol_factory, address, port)
                elif _timeout is not None:  # Python 3.11+: a timer, not a Task as wait_for
                    async with _timeout(timeout):
                        transport, _ = await loop.create_connection(protocol_factory, address, port)
                else:
                    transport, _ = await asyncio.wait_for(
                        loop.create_connection(protocol_factory, address, port), timeout
                    )
            except (OSError, asyncio.TimeoutError) as exc:
                target = join_host_port(address, port)
                if address != host:
                    target += f" ({host})"
                errors.append(f"cannot dial to {target}: {_reason(exc, timeout)}")
                continue
            # The event loop set TCP_NODELAY already; the keep-alive options are ours.
            sock = transport.get_extra_info("socket")
            for level, option, value in self._options:
                with suppress(OSError):  # best effort, like mtg
                    sock.setsockopt(level, option, value)
            return transport
        raise _joined(errors)

    def _literal(self, host: str) -> str | None:
        try:
            return self._literals[host]
        except KeyError:
            pass
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ipaddress.ip_address(bare)
        except ValueError:
            literal = None
        else:
            literal = bare
        if len(self._literals) < 1024:
            self._literals[host] = literal
        return literal

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

    async def _addresses(self, host: str, port: int) -> list[str]:
        """The addresses to try for ``host``, in order; DialError when there are none."""
        try:
            addresses = await self._resolver.resolve(host)
        except ResolveError as exc:
            raise DialError(f"cannot dial to {join_host_port(host, port)}: {exc}") from None
        if not addresses:
            raise DialError(f"cannot dial to {join_host_port(host, port)}: no addresses")
        return list(addresses)

    async def _dial_direct(self, host: str, port: int) -> socket.socket:
        errors: list[str] = []
        for address in await self._addresses(host, port):
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
        level, option, value = self._options[0]  # SO_KEEPALIVE: errors are not hidden
        sock.setsockopt(level, option, value)
        for level, option, value in self._options[1:]:
            with suppress(OSError):  # best effort, like mtg
                sock.setsockopt(level, option, value)

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
