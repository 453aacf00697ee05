"""Loopback servers for doctor's tests, all on one asyncio loop in a background thread.

- :class:`SNTPResponder` (UDP): answers with a clock shifted by ``offset`` seconds, or
  stays silent;
- :class:`DNSServer` (UDP, dnspython): A/AAAA records per name, NXDOMAIN otherwise;
- :class:`EchoServer` (HTTP or HTTPS): answers ``GET`` with the caller's address;
- :class:`TLSSite`: a TLS server with a chosen certificate (valid, wrong name,
  self-signed), answering HTTP requests once TLS is up; optionally one that "prefers"
  X25519MLKEM768 (it answers a HelloRetryRequest for it);
- :class:`PlainServer`: TCP that is not TLS (sends an HTTP error, or stays silent);
- :class:`Listener`: accepts TCP connections and holds them (a fake DC for dialling);
- :class:`Socks5Server`: SOCKS5 CONNECT (optionally with a user name and password),
  relaying to the target and recording it.

Doctor runs in the test's own thread (``asyncio.run``), so these servers must not share
its loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar, cast

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import trustme

from tests.support.tlsface import asks_post_quantum, client_hello_info, retry_request

T = TypeVar("T")
NTP_EPOCH = 2_208_988_800


class ServerLoop:
    """An asyncio loop in a daemon thread; :meth:`call` runs a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._closers: list[Any] = []

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def keep(self, closer: Any) -> None:
        self._closers.append(closer)

    def close(self) -> None:
        async def shutdown() -> None:
            for closer in reversed(self._closers):
                with contextlib.suppress(Exception):
                    result = closer()
                    if asyncio.iscoroutine(result):
                        await result
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.call(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


# -- SNTP --------------------------------------------------------------------------------


def _ntp(unix: float) -> int:
    seconds = unix + NTP_EPOCH
    return (int(seconds) << 32) | int((seconds % 1) * (1 << 32))


class SNTPResponder(asyncio.DatagramProtocol):
    """Answers SNTP requests with our clock + ``offset``; ``silent`` drops them."""

    def __init__(self, offset: float = 0.0, *, silent: bool = False, stratum: int = 2) -> None:
        self.offset = offset
        self.silent = silent
        self.stratum = stratum
        self.requests = 0
        self.port = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.requests += 1
        if self.silent or len(data) < 48 or self.transport is None:
            return
        originate = data[40:48]
        now = _ntp(time.time() + self.offset)
        reply = struct.pack(">BBbb II 4s Q", (4 << 3) | 4, self.stratum, 3, -20, 0, 0, b"LOCL", now)
        reply += originate + struct.pack(">QQ", now, now)
        self.transport.sendto(reply, addr)

    async def start(self, host: str = "127.0.0.1") -> int:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(host, 0))
        self.port = transport.get_extra_info("sockname")[1]
        return self.port

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


# -- DNS ---------------------------------------------------------------------------------


class DNSServer(asyncio.DatagramProtocol):
    """``records``: name (lower-case, no trailing dot) -> [(type, address)]. Unknown -> NXDOMAIN."""

    def __init__(self, records: dict[str, list[tuple[str, str]]]) -> None:
        self.records = records
        self.queries: list[tuple[str, str]] = []
        self.port = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        response = dns.message.make_response(query)
        if name not in self.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            values = [value for kind, value in self.records[name] if kind == rdtype]
            if values:
                response.answer.append(
                    dns.rrset.from_text(question.name, 60, "IN", rdtype, *values)
                )
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=("127.0.0.1", 0)
        )
        self.port = transport.get_extra_info("sockname")[1]
        return self.port

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


# -- TCP servers -------------------------------------------------------------------------


class _TCPServer:
    host = "127.0.0.1"

    def __init__(self) -> None:
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.connections = 0
        self.ssl: ssl.SSLContext | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, self.host, 0, ssl=self.ssl)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class Listener(_TCPServer):
    """Accepts and holds connections until the peer closes (a DC that only needs a connect)."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass


class Recorder(_TCPServer):
    """Records everything each connection sent until it closed; answers nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.received.append(await reader.read())


class EchoServer(_TCPServer):
    """An IP echo service: ``GET`` -> 200 with the caller's address (or ``answer``)."""

    def __init__(
        self, host: str = "127.0.0.1", *, tls: ssl.SSLContext | None = None, answer: str = ""
    ) -> None:
        super().__init__()
        self.host = host
        self.ssl = tls
        self.answer = answer
        self.requests: list[bytes] = []

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/ip"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        body = (self.answer or writer.get_extra_info("peername")[0]).encode() + b"\n"
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )
        await writer.drain()


class TLSSite(_TCPServer):
    """A TLS server with the certificate ``cert_chain`` (PEM) and ``key`` (PEM).

    ``post_quantum``: a server that prefers X25519MLKEM768. Python's ssl cannot negotiate
    it, so a front reads each ClientHello first: one that offers the group without its key
    share gets a HelloRetryRequest naming it (what such a server answers); everything else
    goes on to the TLS server behind. ``retries`` counts those answers.
    """

    def __init__(self, context: ssl.SSLContext, *, post_quantum: bool = False) -> None:
        super().__init__()
        self.ssl = context
        self.post_quantum = post_quantum
        self.retries = 0
        self._inner: TLSSite | None = None

    async def start(self) -> int:
        if not self.post_quantum:
            return await super().start()
        self._inner = TLSSite(self.ssl)
        await self._inner.start()
        self.server = await asyncio.start_server(self._front, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _front(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._inner is not None
        try:
            first = await reader.read(5)
            if first[:1] == b"\x16" and len(first) == 5:
                first += await reader.readexactly(int.from_bytes(first[3:5], "big"))
                if asks_post_quantum(client_hello_info(first)):
                    self.retries += 1
                    writer.write(retry_request(first))
                    await writer.drain()
                    await reader.read()
                    return
            up_reader, up_writer = await asyncio.open_connection(self.host, self._inner.port)
            up_writer.write(first)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    def close(self) -> None:
        super().close()
        if self._inner is not None:
            self._inner.close()


class PlainServer(_TCPServer):
    """Not TLS: sends ``greeting`` (if any) and then holds the connection."""

    def __init__(self, greeting: bytes = b"HTTP/1.0 400 Bad Request\r\n\r\n") -> None:
        super().__init__()
        self.greeting = greeting

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.greeting:
            writer.write(self.greeting)
            await writer.drain()
        while await reader.read(65536):
            pass


class Socks5Server(_TCPServer):
    """SOCKS5 CONNECT; with ``credentials`` only username/password authentication."""

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.credentials = credentials
        self.targets: list[tuple[str, int]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _version, count = await reader.readexactly(2)
        methods = await reader.readexactly(count)
        if self.credentials is None:
            writer.write(b"\x05\x00")
        elif 2 in methods:
            writer.write(b"\x05\x02")
            await reader.readexactly(1)
            user = await reader.readexactly((await reader.readexactly(1))[0])
            password = await reader.readexactly((await reader.readexactly(1))[0])
            ok = (user.decode(), password.decode()) == self.credentials
            writer.write(b"\x01\x00" if ok else b"\x01\x01")
            if not ok:
                return
        else:
            writer.write(b"\x05\xff")
            return
        _, _command, _, atyp = await reader.readexactly(4)
        if atyp == 1:
            host = socket.inet_ntop(socket.AF_INET, await reader.readexactly(4))
        elif atyp == 4:
            host = socket.inet_ntop(socket.AF_INET6, await reader.readexactly(16))
        else:
            host = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
        port = struct.unpack(">H", await reader.readexactly(2))[0]
        self.targets.append((host, port))
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.write(b"\x05\x05\x00\x01" + bytes(6))  # connection refused
            return
        writer.write(b"\x05\x00\x00\x01" + bytes(6))
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


# -- certificates ------------------------------------------------------------------------


def site_context(
    ca: trustme.CA, *names: str, alpn: Sequence[str] = ("http/1.1",)
) -> ssl.SSLContext:
    """A server context with a certificate for ``names`` issued by ``ca``, choosing among
    ``alpn`` (in its order)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*names).configure_cert(context)
    context.set_alpn_protocols(list(alpn))
    return context


def self_signed_context(ca: trustme.CA) -> ssl.SSLContext:
    """A server context presenting ``ca``'s own self-signed certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with ca.cert_pem.tempfile() as cert, ca.private_key_pem.tempfile() as key:
        context.load_cert_chain(cert, key)
    return context


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
