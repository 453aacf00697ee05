"""Name resolution for outgoing connections (protocol.md §12).

``make_resolver(network.dns)`` picks one of these by the config's
:class:`~mtgworkers.config.DnsServer` (which has the defaults filled in):

- ``None``                      the system resolver (``getaddrinfo``: /etc/hosts, nsswitch);
- ``udp://IP[:port]`` or ``IP``  classic DNS to that server, retried over TCP when truncated;
- ``tls://host[:port]``         DNS-over-TLS (RFC 7858), port 853 by default;
- ``https://host[:port][/path]`` DNS-over-HTTPS (RFC 8484, POST), path ``/dns-query`` by default,
  over HTTP/2 or HTTP/1.1 as the server picks by ALPN.

Every resolver answers ``resolve(host)`` with IP strings (an IP literal is
returned as is, without a query), caches positive answers for min(TTL, 1 h)
like mtg, never caches failures, coalesces concurrent look-ups of one name and
bounds each look-up by a timeout. Failures raise :class:`ResolveError`.

The host names of DoT/DoH servers themselves are resolved with the system
resolver (there is nothing else to bootstrap from); TLS verification uses the
system trust store unless an ``ssl_context`` is given (tests). A DoH context
should offer :data:`DOH_ALPN`: without ALPN the server is spoken to in HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import dns.asyncbackend
import dns.asyncquery
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from mtgworkers.config.errors import ConfigError
from mtgworkers.config.urls import DnsServer, parse_dns
from mtgworkers.net.http import ResponseError, Wording, read_response
from mtgworkers.netaddr import bracket_host, join_host_port

__all__ = [
    "DEFAULT_TIMEOUT",
    "DOH_ALPN",
    "MAX_CACHE_TTL",
    "HttpsResolver",
    "ResolveError",
    "Resolver",
    "SystemResolver",
    "TlsResolver",
    "UdpResolver",
    "make_resolver",
]

DEFAULT_TIMEOUT = 5.0  # seconds for one resolve() (both record types, retries included)
MAX_CACHE_TTL = 3600.0  # mtg: dns.MaxCacheTTL(time.Hour)
# getaddrinfo() does not tell the TTL; keep its answers this long.
SYSTEM_CACHE_TTL = 60.0
MAX_CACHE_ENTRIES = 4096
# A lost UDP datagram is sent again after this long, until the overall timeout.
UDP_RETRY_INTERVAL = 2.0
# EDNS0 buffer size recommended by DNS flag day 2020: avoids IP fragmentation.
EDNS_PAYLOAD = 1232

_MAX_DNS_MESSAGE = 65535
_MAX_HTTP_HEAD = 16384
_DOH_MEDIA_TYPE = "application/dns-message"
# ALPN offered to DoH servers, preferred first (mtg's Go client also negotiates h2).
DOH_ALPN = ("h2", "http/1.1")


class ResolveError(OSError):
    """A host name could not be resolved; ``str()`` says which and why."""


class _QueryError(Exception):
    """Transport-level failure of a query; becomes a ResolveError with the host name."""


Clock = Callable[[], float]


def _ip_literal(host: str) -> str | None:
    """``host`` itself when it is an IP address (an IPv6 one possibly in brackets)."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        return None
    return bare


def _describe(exc: BaseException) -> str:
    """Short human text for an exception raised while querying."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message}"
    if isinstance(exc, socket.gaierror) and exc.strerror:
        return exc.strerror
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


class Resolver:
    """Base resolver: IP literals, the cache, coalescing and the timeout.

    Subclasses implement :meth:`_query`, which returns ``(addresses, ttl)`` for
    a name and raises ResolveError (already worded) or any OSError /
    DNSException / _QueryError (worded here).
    """

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT, clock: Clock = time.monotonic) -> None:
        """``timeout``: seconds one resolve() may take (> 0); ``clock``: monotonic seconds."""
        if not timeout > 0:
            raise ValueError(f"resolver timeout must be positive, got {timeout!r}")
        self.timeout = timeout
        self._clock = clock
        self._cache: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._inflight: dict[str, asyncio.Future[tuple[str, ...]]] = {}

    async def resolve(self, host: str) -> list[str]:
        """IP address strings of ``host``; an IP literal comes back as ``[host]``.

        Raises ResolveError ("cannot resolve <host>: <reason>") when the name
        does not exist, has no A/AAAA records, or the look-up fails or times out.
        """
        literal = _ip_literal(host)
        if literal is not None:
            return [literal]
        key = host.lower()
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > self._clock():
                return list(cached[1])
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._lookup(host, key))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        # shield: one cancelled caller must not cancel the look-up the others wait for.
        return list(await asyncio.shield(task))

    def clear_cache(self) -> None:
        """Forget every cached answer."""
        self._cache.clear()

    def _forget(self, key: str, task: asyncio.Future[tuple[str, ...]]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" noise

    async def _lookup(self, host: str, key: str) -> tuple[str, ...]:
        try:
            addresses, ttl = await asyncio.wait_for(self._query(host), self.timeout)
        except ResolveError:
            raise
        except asyncio.TimeoutError:
            raise ResolveError(f"cannot resolve {host}: timeout after {self.timeout:g}s") from None
        except (OSError, EOFError, dns.exception.DNSException, _QueryError) as exc:
            raise ResolveError(f"cannot resolve {host}: {_describe(exc)}") from exc
        result = tuple(addresses)
        if not result:
            raise ResolveError(f"cannot resolve {host}: no addresses")
        if ttl > 0:
            self._store(key, result, min(float(ttl), MAX_CACHE_TTL))
        return result

    def _store(self, key: str, addresses: tuple[str, ...], ttl: float) -> None:
        now = self._clock()
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            for name in [k for k, (expiry, _) in self._cache.items() if expiry <= now]:
                del self._cache[name]
            while len(self._cache) >= MAX_CACHE_ENTRIES:
                del self._cache[next(iter(self._cache))]  # oldest insertion first
        self._cache[key] = (now + ttl, addresses)

    async def _query(self, host: str) -> tuple[list[str], float]:
        raise NotImplementedError


class SystemResolver(Resolver):
    """The operating system's resolver (``loop.getaddrinfo``), IPv4 and IPv6.

    Addresses keep getaddrinfo's order (RFC 6724, which knows the host's
    connectivity); answers are cached for SYSTEM_CACHE_TTL seconds.
    """

    async def _query(self, host: str) -> tuple[list[str], float]:
        infos = await self._getaddrinfo(host)
        addresses = _unique(
            str(sockaddr[0])
            for family, _, _, _, sockaddr in infos
            if family in (socket.AF_INET, socket.AF_INET6)
        )
        return addresses, SYSTEM_CACHE_TTL

    async def _getaddrinfo(self, host: str) -> Sequence[tuple]:
        loop = asyncio.get_running_loop()
        return await loop.getaddrinfo(host, None, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM)


class _MessageResolver(Resolver):
    """Resolvers that speak the DNS wire format: ask A and AAAA, read the answers."""

    async def _query(self, host: str) -> tuple[list[str], float]:
        try:
            name = dns.name.from_text(host)
        except dns.exception.DNSException as exc:
            raise ResolveError(f"cannot resolve {host}: invalid name: {exc}") from None
        queries = [
            self._make_query(name, dns.rdatatype.A),
            self._make_query(name, dns.rdatatype.AAAA),
        ]
        outcomes = await self._exchange(queries)
        addresses: list[str] = []
        ttls: list[float] = []
        reasons: list[str] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                reasons.append(_describe(outcome))
                continue
            found, ttl, reason = self._read_answer(outcome)
            if found:
                addresses += found
                ttls.append(ttl)
            elif reason:
                reasons.append(reason)
        if addresses:
            # One family answering is enough (a failed AAAA must not hide a good A).
            return _unique(addresses), min(ttls)
        if "NXDOMAIN" in reasons:
            raise ResolveError(f"cannot resolve {host}: NXDOMAIN")
        if reasons:
            raise ResolveError(f"cannot resolve {host}: {reasons[0]}")
        raise ResolveError(f"cannot resolve {host}: no A or AAAA records")

    def _make_query(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> dns.message.Message:
        return dns.message.make_query(name, rdtype, use_edns=0, payload=EDNS_PAYLOAD)

    @staticmethod
    def _read_answer(response: dns.message.Message) -> tuple[list[str], float, str | None]:
        """(addresses, ttl, failure reason) of one response; reason None = no data."""
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            return [], 0.0, dns.rcode.to_text(rcode)
        if not isinstance(response, dns.message.QueryMessage):
            return [], 0.0, "answer is not a query response"
        try:
            chain = response.resolve_chaining()
        except dns.exception.DNSException as exc:
            return [], 0.0, f"malformed answer: {_describe(exc)}"
        if chain.answer is None:
            return [], 0.0, None
        found = [str(rdata.address) for rdata in chain.answer]
        return found, float(chain.minimum_ttl), None

    async def _exchange(
        self, queries: list[dns.message.Message]
    ) -> Sequence[dns.message.Message | BaseException]:
        """Send the queries; one response or exception per query, in order."""
        raise NotImplementedError


def _backend() -> dns.asyncbackend.Backend:
    return dns.asyncbackend.get_backend("asyncio")


class UdpResolver(_MessageResolver):
    """Plain DNS over UDP to one server (an IP), over TCP when the answer is truncated."""

    def __init__(
        self,
        server: str,
        port: int = 53,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Clock = time.monotonic,
    ) -> None:
        """``server`` must be an IP literal; raises ValueError otherwise."""
        super().__init__(timeout=timeout, clock=clock)
        literal = _ip_literal(server)
        if literal is None:
            raise ValueError(f"DNS server must be an IP address, got {server!r}")
        self.server = literal
        self.port = port

    async def _exchange(
        self, queries: list[dns.message.Message]
    ) -> Sequence[dns.message.Message | BaseException]:
        return await asyncio.gather(*(self._ask(q) for q in queries), return_exceptions=True)

    async def _ask(self, query: dns.message.Message) -> dns.message.Message:
        # Datagrams get lost: send again every UDP_RETRY_INTERVAL until resolve()'s
        # overall timeout cancels us.
        while True:
            try:
                response, _ = await dns.asyncquery.udp_with_fallback(
                    query,
                    self.server,
                    timeout=min(UDP_RETRY_INTERVAL, self.timeout),
                    port=self.port,
                    backend=_backend(),
                )
            except dns.exception.Timeout:
                continue
            return response


class _TlsServerResolver(_MessageResolver):
    """Shared set-up of DoT and DoH: the server's name, port and TLS context."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(timeout=timeout, clock=clock)
        self.host = _ip_literal(host) or host
        self.port = port
        self._ssl_context = ssl_context or self._default_context()
        # The server's own name cannot be resolved through itself.
        self._bootstrap = SystemResolver(timeout=timeout, clock=clock)

    @staticmethod
    def _default_context() -> ssl.SSLContext:
        return ssl.create_default_context()

    async def _server_addresses(self) -> list[str]:
        try:
            return await self._bootstrap.resolve(self.host)
        except ResolveError as exc:
            # Reported under the name the caller asked for, so say whose name failed.
            raise _QueryError(f"DNS server address: {exc}") from None


class TlsResolver(_TlsServerResolver):
    """DNS-over-TLS (RFC 7858): both queries over one TLS connection to the server.

    The certificate is verified against ``host`` (also sent as SNI when it is a name).
    """

    def __init__(
        self,
        host: str,
        port: int = 853,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(host, port, ssl_context=ssl_context, timeout=timeout, clock=clock)

    async def _exchange(
        self, queries: list[dns.message.Message]
    ) -> Sequence[dns.message.Message | BaseException]:
        backend = _backend()
        failures: list[str] = []
        for address in await self._server_addresses():
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            try:
                stream = await backend.make_socket(
                    family,
                    socket.SOCK_STREAM,
                    0,
                    None,
                    (address, self.port),
                    self.timeout,
                    self._ssl_context,
                    self.host,
                )
            except (OSError, dns.exception.DNSException) as exc:
                failures.append(f"{join_host_port(address, self.port)}: {_describe(exc)}")
                continue
            async with stream:
                responses: list[dns.message.Message | BaseException] = []
                for query in queries:
                    responses.append(
                        await dns.asyncquery.tls(
                            query, address, timeout=self.timeout, port=self.port, sock=stream
                        )
                    )
                return responses
        raise _QueryError(f"cannot connect to DNS-over-TLS server: {'; '.join(failures)}")


class HttpsResolver(_TlsServerResolver):
    """DNS-over-HTTPS (RFC 8484): POST application/dns-message over HTTP/2 or HTTP/1.1.

    ALPN offers both (:data:`DOH_ALPN`). Over HTTP/2 both queries are two streams
    of one connection (the h2 library keeps the protocol state, we move the bytes);
    over HTTP/1.1 (also when the server picks no ALPN) both go over one keep-alive
    connection, read by the package's HTTP/1.1 answer reader
    (:func:`mtgworkers.net.http.read_response`).
    """

    def __init__(
        self,
        host: str,
        port: int = 443,
        path: str = "/dns-query",
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(host, port, ssl_context=ssl_context, timeout=timeout, clock=clock)
        self.path = path or "/dns-query"

    @staticmethod
    def _default_context() -> ssl.SSLContext:
        context = ssl.create_default_context()
        context.set_alpn_protocols(list(DOH_ALPN))
        return context

    def _make_query(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> dns.message.Message:
        query = super()._make_query(name, rdtype)
        query.id = 0  # RFC 8484 §4.1: ID 0 makes answers HTTP-cache friendly
        return query

    async def _exchange(
        self, queries: list[dns.message.Message]
    ) -> Sequence[dns.message.Message | BaseException]:
        reader, writer = await self._connect()
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
            return await self._exchange_h2(reader, writer, queries)
        return await self._exchange_http1(reader, writer, queries)

    async def _exchange_http1(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        queries: list[dns.message.Message],
    ) -> list[dns.message.Message | BaseException]:
        must_reconnect = False
        try:
            responses: list[dns.message.Message | BaseException] = []
            for index, query in enumerate(queries):
                if index and must_reconnect:
                    writer.close()
                    reader, writer = await self._connect()
                wire = query.to_wire()
                writer.write(self._request_head(len(wire)) + wire)
                status, headers, body = await _read_http_response(reader)
                if status != 200:
                    raise _QueryError(f"DNS-over-HTTPS server answered HTTP {status}")
                responses.append(_doh_answer(query, body))
                # The server will not take another request on this connection.
                must_reconnect = "close" in headers.get("connection", "").lower()
            return responses
        finally:
            writer.close()

    async def _exchange_h2(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        queries: list[dns.message.Message],
    ) -> list[dns.message.Message | BaseException]:
        """All queries as concurrent streams; one answer or _QueryError per query.

        A problem of one stream (RST_STREAM, a status other than 200, a wrong
        content type, an oversized or bad body) fails that query only; one of the
        connection (GOAWAY, EOF, a protocol error) fails every query still open.
        """
        try:
            exchange = _H2Exchange(queries, self._h2_request_headers)
            writer.write(exchange.data_to_send())
            while not exchange.done:
                if not exchange.receive(await reader.read(_MAX_DNS_MESSAGE + 1)):
                    break
                writer.write(exchange.data_to_send())  # settings ACKs, window updates, pings
            return exchange.outcomes()
        finally:
            writer.close()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        failures: list[str] = []
        for address in await self._server_addresses():
            try:
                return await asyncio.open_connection(
                    address,
                    self.port,
                    ssl=self._ssl_context,
                    server_hostname=self.host,
                    limit=_MAX_HTTP_HEAD,
                )
            except OSError as exc:
                failures.append(f"{join_host_port(address, self.port)}: {_describe(exc)}")
        raise _QueryError(f"cannot connect to DNS-over-HTTPS server: {'; '.join(failures)}")

    def _authority(self) -> str:
        """The Host header / :authority: the port only when it is not 443."""
        return join_host_port(self.host, self.port) if self.port != 443 else bracket_host(self.host)

    def _request_head(self, length: int) -> bytes:
        return (
            f"POST {self.path} HTTP/1.1\r\n"
            f"Host: {self._authority()}\r\n"
            f"Content-Type: {_DOH_MEDIA_TYPE}\r\n"
            f"Accept: {_DOH_MEDIA_TYPE}\r\n"
            f"Content-Length: {length}\r\n"
            "\r\n"
        ).encode("ascii")

    def _h2_request_headers(self, length: int) -> list[tuple[str, str]]:
        return [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", self._authority()),
            (":path", self.path),
            ("content-type", _DOH_MEDIA_TYPE),
            ("accept", _DOH_MEDIA_TYPE),
            ("content-length", str(length)),
        ]


def _doh_answer(query: dns.message.Message, body: bytes) -> dns.message.Message:
    """The DNS message in a 200 answer's ``body``; raises _QueryError."""
    try:
        response = dns.message.from_wire(body)
    except dns.exception.DNSException as exc:
        raise _QueryError(f"bad DNS message from DNS-over-HTTPS server: {exc}") from None
    if not query.is_response(response):
        raise _QueryError("DNS-over-HTTPS server answered a different question")
    return response


# Received headers stay bytes (no decoding guesses); h2 checks them against HTTP/2's rules.
_H2_CONFIG = h2.config.H2Configuration(client_side=True, header_encoding=None)


class _H2Stream:
    """One query's HTTP/2 stream: the body so far, then the answer or the error."""

    def __init__(self, query: dns.message.Message) -> None:
        self.query = query
        self.body = bytearray()
        self.outcome: dns.message.Message | _QueryError | None = None


class _H2Exchange:
    """One DNS-over-HTTPS exchange over HTTP/2 without I/O: every query as a concurrent
    stream, the server's bytes in, one answer or _QueryError per query out.

    ``HttpsResolver._exchange_h2`` moves the bytes; the fuzz harness feeds them directly.
    """

    def __init__(
        self,
        queries: list[dns.message.Message],
        request_headers: Callable[[int], list[tuple[str, str]]],
    ) -> None:
        self.connection = h2.connection.H2Connection(_H2_CONFIG)
        self.connection.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: _MAX_HTTP_HEAD,
            },
        )
        self.connection.initiate_connection()
        self.streams: dict[int, _H2Stream] = {}
        for query in queries:
            stream_id = self.connection.get_next_available_stream_id()
            wire = query.to_wire()
            self.connection.send_headers(stream_id, request_headers(len(wire)))
            self.connection.send_data(stream_id, wire, end_stream=True)
            self.streams[stream_id] = _H2Stream(query)

    @property
    def done(self) -> bool:
        """Every stream has its outcome."""
        return all(stream.outcome is not None for stream in self.streams.values())

    def data_to_send(self) -> bytes:
        return self.connection.data_to_send()

    def receive(self, data: bytes) -> bool:
        """Take the server's bytes (``b""``: end of stream); False when the connection is
        over (end of stream, a protocol error), which fails every query still open."""
        if not data:
            _fail_open(self.streams, "DNS-over-HTTPS server closed the connection early")
            return False
        try:
            events = self.connection.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            _fail_open(self.streams, f"HTTP/2 protocol error from DNS-over-HTTPS server: {exc}")
            return False
        for event in events:
            _h2_event(self.connection, self.streams, event)
        return True

    def outcomes(self) -> list[dns.message.Message | BaseException]:
        """One answer or _QueryError per query, in the order of the queries."""
        return [
            _QueryError("no answer") if stream.outcome is None else stream.outcome
            for stream in self.streams.values()
        ]


def _h2_error_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return f"error code {code:#x}"


def _fail_open(streams: dict[int, _H2Stream], reason: str) -> None:
    for stream in streams.values():
        if stream.outcome is None:
            stream.outcome = _QueryError(reason)


def _h2_event(
    connection: h2.connection.H2Connection, streams: dict[int, _H2Stream], event: h2.events.Event
) -> None:
    """Apply one HTTP/2 event to the streams; events of other streams are ignored."""
    if isinstance(event, h2.events.ConnectionTerminated):
        code = _h2_error_name(event.error_code or 0)
        _fail_open(streams, f"DNS-over-HTTPS server closed the HTTP/2 connection (GOAWAY {code})")
        return
    if isinstance(event, h2.events.DataReceived):
        # Hand the flow-control window back, whatever becomes of the data.
        connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    if not isinstance(
        event,
        (
            h2.events.ResponseReceived,
            h2.events.DataReceived,
            h2.events.StreamEnded,
            h2.events.StreamReset,
        ),
    ):
        return  # settings, window updates, pings (h2 answers them), 1xx, trailers
    stream = streams.get(event.stream_id)
    if stream is None or stream.outcome is not None:
        return
    if isinstance(event, h2.events.StreamEnded):
        try:
            stream.outcome = _doh_answer(stream.query, bytes(stream.body))
        except _QueryError as exc:
            stream.outcome = exc
        return
    if isinstance(event, h2.events.StreamReset):
        code = _h2_error_name(event.error_code)
        stream.outcome = _QueryError(f"DNS-over-HTTPS server reset the HTTP/2 stream ({code})")
        return
    try:
        if isinstance(event, h2.events.ResponseReceived):
            _h2_check_head(event.headers)
        else:
            stream.body += event.data
            if len(stream.body) > _MAX_DNS_MESSAGE:
                raise _QueryError("DNS-over-HTTPS answer too large")
    except _QueryError as exc:
        stream.outcome = exc
        if event.stream_ended is None:
            # Nothing more of this stream is wanted (the others go on).
            with contextlib.suppress(h2.exceptions.ProtocolError):
                connection.reset_stream(event.stream_id, h2.errors.ErrorCodes.CANCEL)


def _h2_check_head(headers: Iterable[tuple[bytes | str, bytes | str]]) -> None:
    """Raise _QueryError unless the response head is 200 application/dns-message."""
    fields: dict[str, str] = {}
    for name, value in headers:
        key = name.decode("latin-1") if isinstance(name, bytes) else name
        fields[key.lower()] = value.decode("latin-1") if isinstance(value, bytes) else value
    status = fields.get(":status", "")
    if status != "200":
        raise _QueryError(f"DNS-over-HTTPS server answered HTTP {status[:20]}")
    media_type = fields.get("content-type", "").partition(";")[0].strip().lower()
    if not media_type:
        raise _QueryError("DNS-over-HTTPS server sent no Content-Type")
    if media_type != _DOH_MEDIA_TYPE:
        raise _QueryError(
            f"DNS-over-HTTPS server sent Content-Type {media_type[:80]!r}, not {_DOH_MEDIA_TYPE}"
        )
    length = fields.get("content-length", "")
    if length.isdigit() and int(length) > _MAX_DNS_MESSAGE:
        raise _QueryError(f"DNS-over-HTTPS answer too large: {int(length)} bytes")


# How the HTTP/1.1 answer reader words its errors for a DoH server.
_DOH_WORDING = Wording(
    no_answer="DNS-over-HTTPS server closed the connection early",
    closed="DNS-over-HTTPS server closed the connection early",
    long_line="DNS-over-HTTPS server sent an overlong HTTP line",
    bad_status="malformed HTTP status line from DNS-over-HTTPS server: {line}",
    bad_header="malformed HTTP header from DNS-over-HTTPS server: {line}",
    many_lines="DNS-over-HTTPS server sent overlong HTTP headers",
    long_head="DNS-over-HTTPS server sent overlong HTTP headers",
    many_interim="DNS-over-HTTPS server sent more than {limit} interim (1xx) answers",
    bad_encoding="unsupported transfer encoding from DNS-over-HTTPS server: {value!r}",
    bad_length="bad Content-Length from DNS-over-HTTPS server: {value!r}",
    body_too_large="DNS-over-HTTPS answer too large: {length} bytes",
    body_over_limit="DNS-over-HTTPS answer too large",
    truncated="DNS-over-HTTPS server closed the connection mid-body",
    bad_chunk_size="bad chunk size from DNS-over-HTTPS server: {line}",
    bad_chunk_end="malformed chunk from DNS-over-HTTPS server",
)


async def _read_http_response(
    reader: asyncio.StreamReader,
) -> tuple[int, Mapping[str, str], bytes]:
    """Read one HTTP/1.1 answer: (status, lower-cased headers, body).

    :func:`mtgworkers.net.http.read_response` with a DNS message's limits: a body of at
    most 65535 bytes and a head of at most _MAX_HTTP_HEAD bytes. Raises _QueryError.
    """
    try:
        response = await read_response(
            reader, max_body=_MAX_DNS_MESSAGE, max_head=_MAX_HTTP_HEAD, wording=_DOH_WORDING
        )
    except ResponseError as exc:
        raise _QueryError(str(exc)) from None
    return response.status, response.headers, response.body


def make_resolver(
    dns: DnsServer | str | None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
    clock: Clock = time.monotonic,
) -> Resolver:
    """The resolver for ``[network].dns`` (None = system resolver).

    ``dns`` is the config's :class:`~mtgworkers.config.DnsServer`, used as it is; a string
    (tests, tools) is parsed with :func:`mtgworkers.config.parse_dns`, the rules of the
    config file, and an empty one means the system resolver. ``ssl_context`` replaces the
    system trust store for DoT/DoH (tests); ``timeout`` bounds each resolve(). Raises
    ValueError for a string that is not one of udp://IP[:port], IP, tls://host[:port],
    https://host[:port][/path].
    """
    if isinstance(dns, str):
        server = _parse_server(dns)
        if server is None:
            return SystemResolver(timeout=timeout, clock=clock)
    elif dns is None:
        return SystemResolver(timeout=timeout, clock=clock)
    else:
        server = dns
    if server.scheme == "udp":
        return UdpResolver(server.host, server.port, timeout=timeout, clock=clock)
    if server.scheme == "tls":
        return TlsResolver(
            server.host, server.port, ssl_context=ssl_context, timeout=timeout, clock=clock
        )
    return HttpsResolver(
        server.host, server.port, server.path, ssl_context=ssl_context, timeout=timeout, clock=clock
    )


def _parse_server(text: str) -> DnsServer | None:
    """A ``network.dns`` string as the config file reads it; None when it is blank."""
    if not text.strip():
        return None
    try:
        return parse_dns(text.strip())
    except ConfigError as exc:
        raise ValueError(f"invalid DNS address {text!r}: {exc}") from None
