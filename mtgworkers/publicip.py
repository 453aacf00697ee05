"""Detect this host's public IP address by asking IP echo services over HTTP(S).

mtg asks ``https://ifconfig.co`` with ``Accept: text/plain`` over a TCP connection forced
to IPv4 or IPv6 and takes the trimmed body as the address. We do the same with a small
HTTP/1.1 client of our own (asyncio streams + ssl, no extra dependency) and fall back to
a second well-known service when the first one does not answer.

The service list can be replaced through the ``MTGWORKERS_IP_ECHO_URLS`` environment
variable (comma-separated URLs, ``http://`` allowed). It exists for the test suite,
which runs its own echo server on the loopback interface; it is not a user setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import ssl
from collections.abc import Sequence
from urllib.parse import urlsplit

__all__ = ["DEFAULT_URLS", "ENV_URLS", "configured_urls", "detect"]

DEFAULT_URLS: tuple[str, ...] = ("https://ifconfig.co", "https://icanhazip.com")
ENV_URLS = "MTGWORKERS_IP_ECHO_URLS"

USER_AGENT = "curl/8.5.0"
# An echo service answers with a few dozen bytes; anything much larger is not an address.
_MAX_BODY = 4096
_MAX_HEADER_LINES = 100


def configured_urls() -> tuple[str, ...]:
    """The echo service URLs to use: ``$MTGWORKERS_IP_ECHO_URLS`` if set, else DEFAULT_URLS."""
    raw = os.environ.get(ENV_URLS, "")
    urls = tuple(part.strip() for part in raw.split(",") if part.strip())
    return urls or DEFAULT_URLS


async def detect(
    family: int,
    urls: Sequence[str] = DEFAULT_URLS,
    timeout: float = 5.0,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> str | None:
    """Return this host's public address of ``family`` as seen by an IP echo service.

    ``family`` is ``socket.AF_INET`` or ``socket.AF_INET6``; the connection to the
    service is made over that family only. Each URL of ``urls`` is asked in order with
    ``GET``, ``Accept: text/plain`` and ``User-Agent: curl/8.5.0``, each under its own
    ``timeout`` (seconds); the first ``200`` answer whose trimmed body is an address of
    ``family`` wins (an IPv4-mapped IPv6 answer counts as IPv4). ``ssl_context``
    replaces the default verifying context for ``https://`` URLs.

    Returns the address in canonical text form, or None when no service gave one.
    Never raises for network or protocol failures; raises ValueError for a family other
    than AF_INET/AF_INET6.
    """
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"unsupported address family {family!r}")
    for url in urls:
        try:
            body = await asyncio.wait_for(_fetch(url, family, ssl_context), timeout)
        except (OSError, EOFError, ValueError, UnicodeError, asyncio.TimeoutError):
            continue
        if body is None:
            continue
        address = _parse_address(body, family)
        if address is not None:
            return address
    return None


def _parse_address(body: bytes, family: int) -> str | None:
    try:
        address = ipaddress.ip_address(body.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # Go's net.IP.To4() treats ::ffff:a.b.c.d as IPv4; so do we.
        address = address.ipv4_mapped
    if family == socket.AF_INET and address.version != 4:
        return None
    if family == socket.AF_INET6 and address.version != 6:
        return None
    return str(address)


async def _fetch(url: str, family: int, ssl_context: ssl.SSLContext | None) -> bytes | None:
    """GET ``url``; the body of a 200 answer, None for any other status.

    Raises OSError/EOFError/ValueError on network or protocol failures.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"unsupported URL {url!r}")
    host = parts.hostname
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        host_header += f":{parts.port}"

    context: ssl.SSLContext | None = None
    if tls:
        context = ssl_context if ssl_context is not None else ssl.create_default_context()
    reader, writer = await asyncio.open_connection(
        host,
        port,
        family=family,
        ssl=context,
        server_hostname=host if tls else None,
    )
    try:
        request = (
            f"GET {target} HTTP/1.1\r\n"
            f"Host: {host_header}\r\n"
            f"User-Agent: {USER_AGENT}\r\n"
            "Accept: text/plain\r\n"
            "Connection: close\r\n"
            "\r\n"
        )
        writer.write(request.encode("ascii"))
        await writer.drain()
        return await _read_response(reader)
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await writer.wait_closed()


async def _read_response(reader: asyncio.StreamReader) -> bytes | None:
    status_line = await reader.readline()
    fields = status_line.split(None, 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/1."):
        raise ValueError("not an HTTP/1.x response")
    status = int(fields[1])

    headers: dict[bytes, bytes] = {}
    for _ in range(_MAX_HEADER_LINES):
        line = await reader.readline()
        if not line:
            raise EOFError("connection closed inside the headers")
        if line in (b"\r\n", b"\n"):
            break
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError("malformed header line")
        headers[name.strip().lower()] = value.strip()
    else:
        raise ValueError("too many header lines")

    if status != 200:
        return None
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        return await _read_chunked(reader)
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        if not 0 <= length <= _MAX_BODY:
            raise ValueError("unexpected body length")
        return await reader.readexactly(length)
    body = await reader.read(_MAX_BODY + 1)
    while body and len(body) <= _MAX_BODY:
        more = await reader.read(_MAX_BODY + 1 - len(body))
        if not more:
            break
        body += more
    if len(body) > _MAX_BODY:
        raise ValueError("body too large")
    return body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size_line = await reader.readline()
        if not size_line:
            raise EOFError("connection closed inside a chunked body")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            return body  # trailers, if any, are not needed
        if size < 0 or len(body) + size > _MAX_BODY:
            raise ValueError("body too large")
        body += await reader.readexactly(size)
        await reader.readexactly(2)  # CRLF after the chunk data
