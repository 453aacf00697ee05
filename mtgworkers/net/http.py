"""A small HTTP/1.1 client for the proxy's background downloads.

See docs/protocol.md §5.4 (getProxyConfig), §9 (IP lists) and §11.1 (which downloads go
through the SOCKS5 proxies).

mtg fetches IP lists, Telegram's getProxyConfig and its public address over plain
HTTP(S) ``GET`` requests with the User-Agent ``curl/8.5.0``. That needs very little of
HTTP, so instead of a dependency this module has one function, :func:`http_get`:

- one request per connection (``Connection: close``), ``http://`` and ``https://``;
- the body framed by ``Content-Length``, ``Transfer-Encoding: chunked`` or the end of
  the connection, and never more than ``max_body`` bytes of it kept in memory;
- redirects followed as Go's client does (at most 10), since mtg's downloads get that;
- one total ``timeout`` over everything, like Go's ``http.Client.Timeout``;
- ``open_socket`` lets the caller make the TCP connection, which is how downloads go
  through the SOCKS5 proxies of ``[network]`` (``Dialer.open_socket``);
- every failure is an :class:`HTTPError` (an OSError) whose text starts with
  ``Get "<url>": `` as Go's errors do; passwords in URLs are never shown.

:func:`url_fetcher` wraps it into the ``url -> body`` callable the updaters take, with
mtg's rule that a status of 400 or more is an error.

:func:`read_response` is the one HTTP/1.1 answer reader of the package: :func:`http_get`
uses it, and so does the DNS-over-HTTPS client for servers that speak HTTP/1.1
(:mod:`mtgworkers.net.dns`), each with its own limits and wording (:class:`Wording`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from urllib.parse import SplitResult, quote, urljoin, urlsplit, urlunsplit

from mtgworkers.netaddr import bracket_host, join_host_port

__all__ = [
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_HEAD",
    "DEFAULT_WORDING",
    "MAX_HEADER_LINES",
    "MAX_INTERIM",
    "MAX_REDIRECTS",
    "USER_AGENT",
    "HTTPError",
    "HTTPResponse",
    "ResponseError",
    "Wording",
    "http_get",
    "read_response",
    "redact_url",
    "url_fetcher",
]

USER_AGENT = "curl/8.5.0"
# Big enough for any sensible IP list (FireHOL level 1 is under 100 KiB), small enough
# that a misbehaving server cannot make a worker swap.
DEFAULT_MAX_BODY = 32 * 1024 * 1024
MAX_REDIRECTS = 10  # Go's http.Client default

_MAX_LINE = 64 * 1024  # one status/header/chunk-size line (the stream buffer limit)
_READ_SIZE = 64 * 1024
_CLOSE_GRACE = 1.0  # how long to wait for a TLS close_notify exchange on the way out
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NO_BODY = frozenset({204, 304})
# The caller cannot change these: the framing of our reading depends on them.
_FIXED_HEADERS = frozenset({"connection", "content-length", "transfer-encoding"})

OpenSocket = Callable[[str, int], Awaitable[socket.socket]]


class HTTPError(OSError):
    """The request failed: bad URL, connection, TLS, timeout, malformed or oversized answer."""


class _Failure(Exception):
    """Internal: why a request failed, before the URL is put in front of it."""


@dataclass(frozen=True)
class HTTPResponse:
    """A complete answer. ``headers`` has lower-case names; repeated fields are joined by
    ``", "``. ``url`` is the URL that gave this answer (after redirects)."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    url: str = ""


def redact_url(url: str) -> str:
    """``url`` with the password of its user info replaced by ``xxxxx`` (as Go prints it)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:xxxxx@{hostinfo}"))


async def http_get(
    url: str,
    *,
    timeout: float | None,
    headers: Mapping[str, str] | None = None,
    family: int = 0,
    open_socket: OpenSocket | None = None,
    ssl_context: ssl.SSLContext | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    max_redirects: int = MAX_REDIRECTS,
) -> HTTPResponse:
    """``GET url`` and return the final answer, whatever its status.

    ``timeout``: seconds for the whole exchange including redirects (None: no limit).
    ``headers``: extra request fields; they replace our defaults of the same name
    (``User-Agent: curl/8.5.0``, ``Accept: */*``, ``Host``) except the framing ones
    (``Connection``, ``Content-Length``, ``Transfer-Encoding``), which are refused.
    ``family``: ``socket.AF_INET``/``AF_INET6`` to connect over one family only (0: any);
    only for our own connect, so it cannot be combined with ``open_socket``.
    ``open_socket(host, port)``: makes the TCP connection instead of us (e.g.
    ``Dialer.open_socket``, which goes through SOCKS5 proxies); TLS is still ours.
    ``ssl_context``: replaces the default verifying context for ``https://``.
    ``max_body``: the largest body accepted. ``max_redirects``: redirects to follow
    (301/302/303/307/308 with a ``Location``); 0 returns the redirect itself.

    Raises HTTPError (an OSError) for every network or protocol failure, including the
    timeout; ValueError for bad arguments (a header value with CR/LF, ``family`` together
    with ``open_socket``).
    """
    if family and open_socket is not None:
        raise ValueError("family cannot be combined with open_socket")
    request_headers = _request_headers(headers)
    exchange = _follow(
        url, request_headers, family, open_socket, ssl_context, max_body, max_redirects
    )
    if timeout is None:
        return await exchange
    try:
        return await asyncio.wait_for(exchange, timeout)
    except asyncio.TimeoutError:
        raise HTTPError(f'Get "{redact_url(url)}": timeout after {timeout:g}s') from None


def url_fetcher(
    *,
    timeout: float | None,
    open_socket: OpenSocket | None = None,
    ssl_context: ssl.SSLContext | None = None,
    max_body: int = DEFAULT_MAX_BODY,
) -> Callable[[str], Awaitable[bytes]]:
    """A ``fetch(url) -> body`` callable for the background updaters.

    Each call is :func:`http_get` with the given options; an answer with status 400 or
    more raises HTTPError ``Get "<url>": unexpected status code <n>`` (mtg's rule), any
    other final answer gives its body.
    """

    async def fetch(url: str) -> bytes:
        response = await http_get(
            url,
            timeout=timeout,
            open_socket=open_socket,
            ssl_context=ssl_context,
            max_body=max_body,
        )
        if response.status >= 400:
            raise HTTPError(
                f'Get "{redact_url(response.url or url)}": unexpected status code {response.status}'
            )
        return response.body

    return fetch


def _request_headers(headers: Mapping[str, str] | None) -> dict[str, tuple[str, str]]:
    """Lower-case name -> (name as written, value), our defaults overlaid with ``headers``."""
    result = {
        "user-agent": ("User-Agent", USER_AGENT),
        "accept": ("Accept", "*/*"),
    }
    for name, value in (headers or {}).items():
        if (
            not name
            or not name.isascii()
            or any(c in name for c in ":\r\n \t")
            or any(c in value for c in "\r\n")
            or not all(ord(c) < 256 for c in value)  # HTTP/1.1 field values are bytes
        ):
            raise ValueError(f"invalid request header {name!r}")
        if name.lower() in _FIXED_HEADERS:
            raise ValueError(f"request header {name!r} cannot be set")
        result[name.lower()] = (name, value)
    return result


async def _follow(
    url: str,
    headers: dict[str, tuple[str, str]],
    family: int,
    open_socket: OpenSocket | None,
    ssl_context: ssl.SSLContext | None,
    max_body: int,
    max_redirects: int,
) -> HTTPResponse:
    redirects = 0
    while True:
        try:
            response = await _request(url, headers, family, open_socket, ssl_context, max_body)
        except _Failure as exc:
            raise HTTPError(f'Get "{redact_url(url)}": {exc}') from None
        location = response.headers.get("location")
        if response.status not in _REDIRECTS or not location or max_redirects <= 0:
            return response
        if redirects >= max_redirects:
            raise HTTPError(f'Get "{redact_url(url)}": stopped after {max_redirects} redirects')
        redirects += 1
        url = urljoin(url, location)


def _parse_url(url: str) -> tuple[SplitResult, str, int, str]:
    """(parts, host, port, request target) of an http(s) URL; _Failure if it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _Failure(f"invalid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise _Failure(f"unsupported protocol scheme {parts.scheme!r}")
    host = parts.hostname
    if not host:
        raise _Failure("no host in the URL")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise _Failure(f"invalid host name {host!r}") from None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    # Characters that cannot appear raw on the request line are percent-encoded; what is
    # already encoded stays as it is.
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    query = quote(parts.query, safe="/?%:@!$&'()*+,;=-._~") if parts.query else ""
    return parts, host, port, path + (f"?{query}" if query else "")


async def _request(
    url: str,
    headers: dict[str, tuple[str, str]],
    family: int,
    open_socket: OpenSocket | None,
    ssl_context: ssl.SSLContext | None,
    max_body: int,
) -> HTTPResponse:
    parts, host, port, target = _parse_url(url)
    tls = parts.scheme == "https"
    context: ssl.SSLContext | None = None
    if tls:
        context = ssl_context if ssl_context is not None else ssl.create_default_context()
    reader, writer = await _connect(host, port, family, open_socket, context)
    try:
        host_header = bracket_host(host)
        if parts.port is not None:
            host_header += f":{parts.port}"
        lines = [f"GET {target} HTTP/1.1", f"Host: {host_header}"]
        lines += [f"{name}: {value}" for key, (name, value) in headers.items() if key != "host"]
        if "host" in headers:
            lines[1] = f"Host: {headers['host'][1]}"
        lines += ["Connection: close", "", ""]
        writer.write("\r\n".join(lines).encode("latin-1"))
        try:
            await writer.drain()
            response = await read_response(reader, max_body=max_body)
        except ResponseError as exc:
            raise _Failure(str(exc)) from None
        except ssl.SSLError as exc:
            raise _Failure(f"TLS error: {_tls_reason(exc)}") from None
        except OSError as exc:
            raise _Failure(_os_reason(exc)) from None
        return replace(response, url=url)
    finally:
        await _close(writer)


async def _connect(
    host: str,
    port: int,
    family: int,
    open_socket: OpenSocket | None,
    context: ssl.SSLContext | None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    server_hostname = host if context is not None else None
    if open_socket is None:
        try:
            return await asyncio.open_connection(
                host,
                port,
                family=family,
                ssl=context,
                server_hostname=server_hostname,
                limit=_MAX_LINE,
            )
        except ssl.SSLError as exc:
            raise _Failure(f"TLS handshake failed: {_tls_reason(exc)}") from None
        except OSError as exc:
            target = join_host_port(host, port)
            raise _Failure(f"cannot connect to {target}: {_os_reason(exc)}") from None
    try:
        sock = await open_socket(host, port)
    except OSError as exc:
        raise _Failure(str(exc) or type(exc).__name__) from None
    # From here the event loop owns the socket and closes it when the connection fails:
    # closing it here as well could close a reused descriptor under uvloop.
    try:
        return await asyncio.open_connection(
            sock=sock, ssl=context, server_hostname=server_hostname, limit=_MAX_LINE
        )
    except ssl.SSLError as exc:
        raise _Failure(f"TLS handshake failed: {_tls_reason(exc)}") from None
    except OSError as exc:
        raise _Failure(_os_reason(exc)) from None


def _tls_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    return str(exc.reason or exc)


def _os_reason(exc: OSError) -> str:
    # The event loops word connect errors differently ("Connect call failed (...)");
    # the errno text is the same everywhere. getaddrinfo errors have their own numbers.
    if exc.errno and exc.errno > 0 and not isinstance(exc, socket.gaierror):
        text = os.strerror(exc.errno)
    else:
        text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        # Bounded: a TLS peer that never answers our close_notify must not hold us.
        await asyncio.wait_for(writer.wait_closed(), _CLOSE_GRACE)
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
    except (OSError, asyncio.TimeoutError):
        writer.transport.abort()


# --- reading an answer --------------------------------------------------------------------


@dataclass(frozen=True)
class Wording:
    """How :func:`read_response` words each way an answer can be wrong.

    Every field is a :meth:`str.format` template; the placeholders a field may use are
    ``{part}`` (``status line``, ``headers``, ``chunked body`` or ``trailers``), ``{line}``
    (the offending line, shortened and quoted), ``{value}`` (a header value, shortened),
    ``{length}`` (a declared body length), ``{got}`` (bytes received) and ``{limit}``.
    The defaults are :func:`http_get`'s; a caller with its own voice (the DoH client)
    passes its own instance.
    """

    no_answer: str = "connection closed without an answer"
    closed: str = "connection closed inside the {part}"
    long_line: str = "line too long in the {part}"
    bad_status: str = "malformed HTTP response {line}"
    bad_header: str = "malformed header line {line}"
    many_lines: str = "more than {limit} header lines"
    long_head: str = "{part} longer than {limit} bytes"
    many_interim: str = "more than {limit} interim (1xx) answers"
    bad_encoding: str = "unsupported transfer encoding {value!r}"
    bad_length: str = "bad Content-Length {value!r}"
    body_too_large: str = "body too large: {length} bytes (at most {limit})"
    body_over_limit: str = "body too large: more than {limit} bytes"
    truncated: str = "connection closed after {got} of {length} body bytes"
    bad_chunk_size: str = "bad chunk size {line}"
    bad_chunk_end: str = "malformed chunked body"


class ResponseError(Exception):
    """An answer that breaks HTTP/1.1 framing or one of the reader's limits.

    ``kind`` is the :class:`Wording` field that worded the message, so callers and tests
    can tell the failures apart without matching text.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


DEFAULT_WORDING = Wording()
DEFAULT_MAX_HEAD = 64 * 1024  # status line + header lines of one answer (also the trailers)
MAX_HEADER_LINES = 100
MAX_INTERIM = 5  # 1xx answers skipped before the final one (Go's client allows as many)
_MAX_CHUNK_DIGITS = 16  # a 64-bit size; more digits are hostile or broken


class _Reader:
    """One answer being read: the stream, the limits and the caller's wording."""

    def __init__(
        self, stream: asyncio.StreamReader, max_body: int, max_head: int, wording: Wording
    ) -> None:
        self.stream = stream
        self.max_body = max_body
        self.max_head = max_head
        self.wording = wording

    def error(self, kind: str, **fields: object) -> ResponseError:
        template: str = getattr(self.wording, kind)
        return ResponseError(kind, template.format(**fields))

    async def line(self, part: str, *, first: bool = False) -> bytes:
        """One line with its ending; ``first``: EOF before any byte is "no answer"."""
        try:
            return await self.stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            kind = "no_answer" if first and not exc.partial else "closed"
            raise self.error(kind, part=part) from None
        except asyncio.LimitOverrunError:
            raise self.error("long_line", part=part) from None

    async def exactly(self, size: int, part: str) -> bytes:
        try:
            return await self.stream.readexactly(size)
        except asyncio.IncompleteReadError:
            raise self.error("closed", part=part) from None

    async def fields(self, part: str, head_size: int) -> dict[str, str]:
        """Header (or trailer) lines up to the empty one: lower-case name -> value,
        repeated names joined by ``", "``. ``head_size``: bytes of the section so far."""
        result: dict[str, str] = {}
        for _ in range(MAX_HEADER_LINES + 1):
            line = await self.line(part)
            head_size += len(line)
            if head_size > self.max_head:
                raise self.error("long_head", part=part, limit=self.max_head)
            if line in (b"\r\n", b"\n"):
                return result
            name, sep, value = line.partition(b":")
            name = name.strip()
            if not sep or not name:
                raise self.error("bad_header", line=_shown(line))
            key = name.decode("latin-1").lower()
            text = value.strip().decode("latin-1")
            result[key] = f"{result[key]}, {text}" if key in result else text
        raise self.error("many_lines", part=part, limit=MAX_HEADER_LINES)

    async def head(self) -> tuple[int, dict[str, str]]:
        """Status and headers of the final answer; interim (1xx) answers are skipped."""
        for _ in range(MAX_INTERIM + 1):
            status_line = await self.line("status line", first=True)
            if len(status_line) > self.max_head:
                raise self.error("long_head", part="status line", limit=self.max_head)
            status = self.status(status_line)
            headers = await self.fields("headers", len(status_line))
            # 100 Continue, 103 Early Hints: the real answer follows on the same stream.
            if not 100 <= status < 200:
                return status, headers
        raise self.error("many_interim", limit=MAX_INTERIM)

    def status(self, line: bytes) -> int:
        parts = line.split(None, 2)
        if (
            len(parts) < 2
            or not parts[0].startswith(b"HTTP/1.")
            or len(parts[1]) != 3
            or not parts[1].isdigit()
        ):
            raise self.error("bad_status", line=_shown(line))
        return int(parts[1])

    async def body(self, status: int, headers: Mapping[str, str]) -> bytes:
        if status in _NO_BODY:
            return b""
        encoding = headers.get("transfer-encoding", "").lower()
        if encoding:
            # Only chunked may come last (RFC 9112 6.1); it wins over any Content-Length.
            if encoding.rsplit(",", 1)[-1].strip() != "chunked":
                raise self.error("bad_encoding", value=encoding[:60])
            return await self.chunked()
        if "content-length" in headers:
            return await self.sized(headers["content-length"])
        return await self.to_eof()

    async def sized(self, text: str) -> bytes:
        # Repeated identical values arrive joined ("5, 5"); different ones are an error.
        values = {value.strip() for value in text.split(",")}
        value = values.pop() if len(values) == 1 else ""
        if not (value.isascii() and value.isdigit()):
            raise self.error("bad_length", value=text[:60])
        length = int(value)
        if length > self.max_body:
            raise self.error("body_too_large", length=length, limit=self.max_body)
        try:
            return await self.stream.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise self.error("truncated", got=len(exc.partial), length=length) from None

    async def to_eof(self) -> bytes:
        body = bytearray()
        while True:
            data = await self.stream.read(_READ_SIZE)
            if not data:
                return bytes(body)
            body += data
            if len(body) > self.max_body:
                raise self.error("body_over_limit", limit=self.max_body)

    async def chunked(self) -> bytes:
        body = bytearray()
        while True:
            line = await self.line("chunked body")
            # Extensions (";name=value") carry nothing we use. Hex digits only: int()
            # alone would also take "0x", "+", "-" and "_".
            size_text = line.split(b";", 1)[0].strip()
            if not size_text or len(size_text) > _MAX_CHUNK_DIGITS or size_text.strip(_HEX_DIGITS):
                raise self.error("bad_chunk_size", line=_shown(line))
            size = int(size_text, 16)
            if size == 0:
                # The trailers are read (and dropped) so that a kept-alive connection is
                # left at the start of the next answer.
                await self.fields("trailers", 0)
                return bytes(body)
            if len(body) + size > self.max_body:
                raise self.error("body_over_limit", limit=self.max_body)
            body += await self.exactly(size, "chunked body")
            if await self.exactly(2, "chunked body") != b"\r\n":
                raise self.error("bad_chunk_end")


async def read_response(
    stream: asyncio.StreamReader,
    *,
    max_body: int,
    max_head: int = DEFAULT_MAX_HEAD,
    wording: Wording = DEFAULT_WORDING,
) -> HTTPResponse:
    """Read one HTTP/1.1 answer from ``stream`` and leave the stream right after it.

    Interim 1xx answers (at most :data:`MAX_INTERIM`) are skipped. The body is framed by
    ``Transfer-Encoding: chunked`` (extensions ignored, trailers read and dropped),
    ``Content-Length`` or the end of the stream; 204 and 304 answers have none.
    ``max_body``: the largest body accepted. ``max_head``: the largest status line plus
    header section, in bytes (the trailers get the same limit); a single line is also
    bounded by the stream's own ``limit``. At most :data:`MAX_HEADER_LINES` header lines.

    Returns an :class:`HTTPResponse` without ``url``; its headers have lower-case names,
    repeated fields joined by ``", "``. Raises ResponseError, worded by ``wording``, for
    every malformed, truncated or oversized answer; errors of the stream itself (OSError,
    ssl.SSLError) pass through.
    """
    reader = _Reader(stream, max_body, max_head, wording)
    status, headers = await reader.head()
    body = await reader.body(status, headers)
    return HTTPResponse(status, body, MappingProxyType(headers))


def _shown(line: bytes) -> str:
    return repr(line.rstrip(b"\r\n")[:60].decode("latin-1"))
