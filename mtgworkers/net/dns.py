"""Name resolution for outgoing connections (protocol.md §12).

``make_resolver(network.dns)`` picks one of:

- ``None``                      the system resolver (``getaddrinfo``: /etc/hosts, nsswitch);
- ``udp://IP[:port]`` or ``IP``  classic DNS to that server, retried over TCP when truncated;
- ``tls://host[:port]``         DNS-over-TLS (RFC 7858), port 853 by default;
- ``https://host[:port][/path]`` DNS-over-HTTPS (RFC 8484, POST), path ``/dns-query`` by default.

Every resolver answers ``resolve(host)`` with IP strings (an IP literal is
returned as is, without a query), caches positive answers for min(TTL, 1 h)
like mtg, never caches failures, coalesces concurrent look-ups of one name and
bounds each look-up by a timeout. Failures raise :class:`ResolveError`.

The host names of DoT/DoH servers themselves are resolved with the system
resolver (there is nothing else to bootstrap from); TLS verification uses the
system trust store unless an ``ssl_context`` is given (tests).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from urllib.parse import urlsplit

import dns.asyncbackend
import dns.asyncquery
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

__all__ = [
    "DEFAULT_TIMEOUT",
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
                failures.append(f"{_hostport(address, self.port)}: {_describe(exc)}")
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
    """DNS-over-HTTPS (RFC 8484): POST application/dns-message over HTTP/1.1.

    Both queries go over one keep-alive connection; a small HTTP/1.1 client of
    our own (Content-Length and chunked bodies) keeps dependencies down.
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
        context.set_alpn_protocols(["http/1.1"])
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
                try:
                    response = dns.message.from_wire(body)
                except dns.exception.DNSException as exc:
                    raise _QueryError(
                        f"bad DNS message from DNS-over-HTTPS server: {exc}"
                    ) from None
                if not query.is_response(response):
                    raise _QueryError("DNS-over-HTTPS server answered a different question")
                responses.append(response)
                # The server will not take another request on this connection.
                must_reconnect = "close" in headers.get("connection", "").lower()
            return responses
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
                failures.append(f"{_hostport(address, self.port)}: {_describe(exc)}")
        raise _QueryError(f"cannot connect to DNS-over-HTTPS server: {'; '.join(failures)}")

    def _request_head(self, length: int) -> bytes:
        host = _hostport(self.host, self.port) if self.port != 443 else _bracket(self.host)
        return (
            f"POST {self.path} HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            f"Content-Type: {_DOH_MEDIA_TYPE}\r\n"
            f"Accept: {_DOH_MEDIA_TYPE}\r\n"
            f"Content-Length: {length}\r\n"
            "\r\n"
        ).encode("ascii")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _hostport(host: str, port: int) -> str:
    return f"{_bracket(host)}:{port}"


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise _QueryError("DNS-over-HTTPS server closed the connection early") from None
    except asyncio.LimitOverrunError:
        raise _QueryError("DNS-over-HTTPS server sent an overlong HTTP line") from None
    return line.rstrip(b"\r\n")


async def _read_exactly(reader: asyncio.StreamReader, size: int) -> bytes:
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise _QueryError("DNS-over-HTTPS server closed the connection mid-body") from None


async def _read_http_response(
    reader: asyncio.StreamReader,
) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response: (status, lower-cased headers, body).

    Skips 1xx interim responses; bodies are Content-Length, chunked or
    read-to-EOF and at most 65535 bytes (one DNS message). Raises _QueryError.
    """
    while True:
        status_line = await _read_line(reader)
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise _QueryError(
                f"malformed HTTP status line from DNS-over-HTTPS server: {status_line[:80]!r}"
            )
        status = int(parts[1])
        headers: dict[str, str] = {}
        size = len(status_line)
        while True:
            line = await _read_line(reader)
            size += len(line)
            if size > _MAX_HTTP_HEAD:
                raise _QueryError("DNS-over-HTTPS server sent overlong HTTP headers")
            if not line:
                break
            name, sep, value = line.partition(b":")
            if not sep:
                raise _QueryError(
                    f"malformed HTTP header from DNS-over-HTTPS server: {line[:80]!r}"
                )
            key = name.strip().decode("latin-1").lower()
            text = value.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        if not 100 <= status < 200:
            break
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    elif "content-length" in headers:
        length_text = headers["content-length"]
        if not length_text.isdigit():
            raise _QueryError(
                f"bad Content-Length from DNS-over-HTTPS server: {length_text[:20]!r}"
            )
        length = int(length_text)
        if length > _MAX_DNS_MESSAGE:
            raise _QueryError(f"DNS-over-HTTPS answer too large: {length} bytes")
        body = await _read_exactly(reader, length)
    else:
        body = await reader.read(_MAX_DNS_MESSAGE + 1)
        while body and len(body) <= _MAX_DNS_MESSAGE:
            more = await reader.read(_MAX_DNS_MESSAGE + 1 - len(body))
            if not more:
                break
            body += more
        if len(body) > _MAX_DNS_MESSAGE:
            raise _QueryError("DNS-over-HTTPS answer too large")
    return status, headers, body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_text = (await _read_line(reader)).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _QueryError(
                f"bad chunk size from DNS-over-HTTPS server: {size_text[:20]!r}"
            ) from None
        if size < 0 or len(body) + size > _MAX_DNS_MESSAGE:
            raise _QueryError("DNS-over-HTTPS answer too large")
        if size == 0:
            while await _read_line(reader):  # trailer fields, up to the empty line
                pass
            return bytes(body)
        body += await _read_exactly(reader, size)
        if await _read_line(reader):
            raise _QueryError("malformed chunk from DNS-over-HTTPS server")


def make_resolver(
    dns: str | None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
    clock: Clock = time.monotonic,
) -> Resolver:
    """The resolver for ``[network].dns`` (None = system resolver).

    ``ssl_context`` replaces the system trust store for DoT/DoH (tests);
    ``timeout`` bounds each resolve(). Raises ValueError for a form that is
    not one of udp://IP[:port], IP, tls://host[:port], https://host[:port][/path].
    """
    if dns is None or not dns.strip():
        return SystemResolver(timeout=timeout, clock=clock)
    text = dns.strip()
    if _ip_literal(text) is not None:
        return UdpResolver(text, timeout=timeout, clock=clock)
    url = urlsplit(text)
    scheme = url.scheme.lower()
    try:
        host = url.hostname
        port = url.port
    except ValueError as exc:
        raise ValueError(f"invalid DNS address {dns!r}: {exc}") from None
    if not host:
        raise ValueError(f"invalid DNS address {dns!r}: no host")
    if url.username is not None or url.password is not None:
        raise ValueError(f"invalid DNS address {dns!r}: user info is not allowed")
    if scheme == "udp":
        if url.path not in ("", "/"):
            raise ValueError(f"invalid DNS address {dns!r}: a path is only allowed for https")
        if _ip_literal(host) is None:
            raise ValueError(f"invalid DNS address {dns!r}: udp needs an IP address")
        return UdpResolver(host, port or 53, timeout=timeout, clock=clock)
    if scheme == "tls":
        if url.path not in ("", "/"):
            raise ValueError(f"invalid DNS address {dns!r}: a path is only allowed for https")
        return TlsResolver(host, port or 853, ssl_context=ssl_context, timeout=timeout, clock=clock)
    if scheme == "https":
        path = url.path or "/dns-query"
        if url.query:
            path = f"{path}?{url.query}"
        return HttpsResolver(
            host, port or 443, path, ssl_context=ssl_context, timeout=timeout, clock=clock
        )
    raise ValueError(f"unsupported DNS scheme {url.scheme!r} in {dns!r}")
