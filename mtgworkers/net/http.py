"""A small HTTP/1.1 client for the proxy's background downloads (protocol.md §5.4, §9, §11.1).

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
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import SplitResult, quote, urljoin, urlsplit, urlunsplit

from mtgworkers.netaddr import bracket_host, join_host_port

__all__ = [
    "DEFAULT_MAX_BODY",
    "MAX_REDIRECTS",
    "USER_AGENT",
    "HTTPError",
    "HTTPResponse",
    "http_get",
    "redact_url",
    "url_fetcher",
]

USER_AGENT = "curl/8.5.0"
# Big enough for any sensible IP list (FireHOL level 1 is under 100 KiB), small enough
# that a misbehaving server cannot make a worker swap.
DEFAULT_MAX_BODY = 32 * 1024 * 1024
MAX_REDIRECTS = 10  # Go's http.Client default

_MAX_HEADER_LINES = 100
_MAX_LINE = 64 * 1024  # one status/header/chunk-size line (also the stream buffer limit)
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
            status, response_headers = await _read_head(reader)
            body = await _read_body(reader, status, response_headers, max_body)
        except ssl.SSLError as exc:
            raise _Failure(f"TLS error: {_tls_reason(exc)}") from None
        except OSError as exc:
            raise _Failure(_os_reason(exc)) from None
        return HTTPResponse(status, body, MappingProxyType(response_headers), url)
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


async def _readline(reader: asyncio.StreamReader, what: str) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise _Failure(f"connection closed inside the {what}") from None
    except asyncio.LimitOverrunError:
        raise _Failure(f"line too long in the {what}") from None
    return line


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """Status and headers of the final (non-1xx) answer."""
    while True:
        try:
            status_line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _Failure("connection closed without an answer") from None
            raise _Failure("connection closed inside the status line") from None
        except asyncio.LimitOverrunError:
            raise _Failure("malformed HTTP response (status line too long)") from None
        status = _parse_status(status_line)
        headers: dict[str, str] = {}
        for _ in range(_MAX_HEADER_LINES):
            line = await _readline(reader, "headers")
            if line in (b"\r\n", b"\n"):
                break
            name, sep, value = line.partition(b":")
            name = name.strip()
            if not sep or not name:
                raise _Failure(f"malformed header line {_shown(line)}")
            key = name.decode("latin-1").lower()
            text = value.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        else:
            raise _Failure(f"more than {_MAX_HEADER_LINES} header lines")
        # 1xx answers are interim (100 Continue, 103 Early Hints): the real one follows.
        if not 100 <= status < 200:
            return status, headers


def _parse_status(line: bytes) -> int:
    fields = line.split(None, 2)
    if (
        len(fields) < 2
        or not fields[0].startswith(b"HTTP/1.")
        or len(fields[1]) != 3
        or not fields[1].isdigit()
    ):
        raise _Failure(f"malformed HTTP response {_shown(line)}")
    return int(fields[1])


def _shown(line: bytes) -> str:
    return repr(line.rstrip(b"\r\n")[:60].decode("latin-1"))


async def _read_body(
    reader: asyncio.StreamReader, status: int, headers: dict[str, str], max_body: int
) -> bytes:
    if status in _NO_BODY:
        return b""
    encoding = headers.get("transfer-encoding", "").lower()
    if encoding:
        if encoding.rsplit(",", 1)[-1].strip() != "chunked":
            raise _Failure(f"unsupported transfer encoding {encoding!r}")
        return await _read_chunked(reader, max_body)
    if "content-length" in headers:
        text = headers["content-length"]
        # Repeated identical values arrive joined ("5, 5"); different ones are an error.
        values = {value.strip() for value in text.split(",")}
        value = values.pop() if len(values) == 1 else ""
        if not (value.isascii() and value.isdigit()):
            raise _Failure(f"bad Content-Length {text!r}")
        length = int(value)
        if length > max_body:
            raise _Failure(f"body too large: {length} bytes (at most {max_body})")
        try:
            return await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise _Failure(
                f"connection closed after {len(exc.partial)} of {length} body bytes"
            ) from None
    return await _read_to_eof(reader, max_body)


async def _read_to_eof(reader: asyncio.StreamReader, max_body: int) -> bytes:
    body = bytearray()
    while True:
        data = await reader.read(_READ_SIZE)
        if not data:
            return bytes(body)
        body += data
        if len(body) > max_body:
            raise _Failure(f"body too large: more than {max_body} bytes")


async def _read_chunked(reader: asyncio.StreamReader, max_body: int) -> bytes:
    body = bytearray()
    while True:
        line = await _readline(reader, "chunked body")
        size_text = line.split(b";", 1)[0].strip()
        # Hex digits only: int() alone would also take "0x", "+", "-" and "_".
        if not size_text or len(size_text) > 16 or size_text.strip(_HEX_DIGITS):
            raise _Failure(f"bad chunk size {_shown(line)}")
        size = int(size_text, 16)
        if size == 0:
            # Trailers are of no use to us, and the connection closes after this answer.
            return bytes(body)
        if len(body) + size > max_body:
            raise _Failure(f"body too large: more than {max_body} bytes")
        try:
            body += await reader.readexactly(size)
            end = await reader.readexactly(2)
        except asyncio.IncompleteReadError:
            raise _Failure("connection closed inside the chunked body") from None
        if end != b"\r\n":
            raise _Failure("malformed chunked body")
