"""Detect this host's public IP address by asking IP echo services over HTTP(S).

mtg asks ``https://ifconfig.co`` with ``Accept: text/plain`` over a TCP connection forced
to IPv4 or IPv6 and takes the trimmed body as the address. We do the same with a small
HTTP/1.1 client of our own (:mod:`mtgworkers.net.http`) and fall back to a second
well-known service when the first one does not answer. Like mtg, this connects directly,
never through the SOCKS5 proxies of ``[network]`` (docs/protocol.md §11.1).

The service list can be replaced through the ``MTGWORKERS_IP_ECHO_URLS`` environment
variable (comma-separated URLs, ``http://`` allowed). It exists for the test suite,
which runs its own echo server on the loopback interface; it is not a user setting.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from collections.abc import Sequence

from mtgworkers.net.http import http_get

__all__ = ["DEFAULT_URLS", "ENV_URLS", "configured_urls", "detect"]

DEFAULT_URLS: tuple[str, ...] = ("https://ifconfig.co", "https://icanhazip.com")
ENV_URLS = "MTGWORKERS_IP_ECHO_URLS"

# An echo service answers with a few dozen bytes; anything much larger is not an address.
_MAX_BODY = 4096


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
    ``timeout`` (seconds, redirects included: they are followed, as Go's client does);
    the first ``200`` answer whose trimmed body is an address of
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
            response = await http_get(
                url,
                timeout=timeout,
                headers={"Accept": "text/plain"},
                family=family,
                ssl_context=ssl_context,
                max_body=_MAX_BODY,
            )
        except OSError:  # HTTPError: no answer, or not a usable one
            continue
        if response.status != 200:
            continue
        address = _parse_address(response.body, family)
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
