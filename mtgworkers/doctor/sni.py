"""SNI-DNS match: does the secret's host name resolve to this server's public addresses?

A censor that sees a TLS connection to our IP with SNI ``www.example.com`` can look the
name up; if it resolves elsewhere, the connection is suspicious. Shared by doctor's
"Validate SNI-DNS match" section, the start-up warning of ``run`` (docs/mtg-compat.md d.3) and
the public address detection of ``access``:

- :func:`public_addresses`: our IPv4/IPv6 from the config, else from IP echo services;
- :func:`family_matches`: mtg's run-time rule, every known family must match;
- :func:`startup_check`: the start-up check with mtg's warnings; never raises.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mtgworkers import publicip

if TYPE_CHECKING:
    from mtgworkers.config import Config
    from mtgworkers.net.dns import Resolver

__all__ = [
    "CANNOT_DETECT",
    "CANNOT_RESOLVE",
    "MISMATCH",
    "PublicAddresses",
    "echo_urls",
    "family_matches",
    "public_addresses",
    "split_families",
    "startup_check",
]

# mtg's start-up messages (docs/mtg-compat.md d.3), pointing at our doctor.
CANNOT_RESOLVE = "SNI-DNS check: cannot resolve secret hostname"
CANNOT_DETECT = (
    "SNI-DNS check: cannot detect public IP address; set public-ipv4/public-ipv6 in config "
    "or run 'mtgworkers doctor'"
)
MISMATCH = (
    "SNI-DNS mismatch: secret hostname does not resolve to this server's public IP. DPI may "
    "detect and block the proxy. See 'mtgworkers doctor' for details"
)

_log = logging.getLogger("mtgworkers")


@dataclass(frozen=True)
class PublicAddresses:
    """Our public addresses and where each came from (``"config"``, ``"detected"``, ...)."""

    ipv4: str | None
    ipv6: str | None
    ipv4_source: str | None = None
    ipv6_source: str | None = None


def echo_urls(config: Config, override: Sequence[str] = ()) -> tuple[str, ...]:
    """The IP echo services to ask: ``override`` (command line), else ``[doctor]
    ip-echo-urls``, else ``$MTGWORKERS_IP_ECHO_URLS``, else publicip.DEFAULT_URLS."""
    if override:
        return tuple(override)
    if config.doctor.ip_echo_urls:
        return config.doctor.ip_echo_urls
    return publicip.configured_urls()


def of_family(value: str | None, version: int) -> str | None:
    """``value`` in canonical form if it is an address of IP ``version`` (4 or 6)."""
    if not value:
        return None
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address) if address.version == version else None


async def public_addresses(
    ipv4: str | None,
    ipv6: str | None,
    urls: Sequence[str],
    timeout: float,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> PublicAddresses:
    """Our public IPv4 and IPv6: the given ones (from flags or the config), the missing
    ones asked from the IP echo services ``urls`` over that family, both at once, each
    service with ``timeout`` seconds. An address of the wrong family counts as missing.
    Never raises for network failures (an undetected family is None).
    """
    known4, known6 = of_family(ipv4, 4), of_family(ipv6, 6)

    async def given(value: str) -> str | None:
        return value

    detected4, detected6 = await asyncio.gather(
        given(known4)
        if known4
        else publicip.detect(socket.AF_INET, urls, timeout, ssl_context=ssl_context),
        given(known6)
        if known6
        else publicip.detect(socket.AF_INET6, urls, timeout, ssl_context=ssl_context),
    )
    return PublicAddresses(
        detected4,
        detected6,
        ("config" if known4 else "detected") if detected4 else None,
        ("config" if known6 else "detected") if detected6 else None,
    )


def split_families(addresses: Sequence[str]) -> tuple[list[str], list[str]]:
    """Resolved addresses split into (IPv4, IPv6), canonical text, order kept."""
    v4: list[str] = []
    v6: list[str] = []
    for text in addresses:
        address4 = of_family(text, 4)
        if address4 is not None:
            v4.append(address4)
            continue
        address6 = of_family(text, 6)
        if address6 is not None:
            v6.append(address6)
    return v4, v6


def family_matches(
    resolved: Sequence[str], ours: PublicAddresses
) -> tuple[bool | None, bool | None]:
    """(IPv4 matches, IPv6 matches); None for a family whose public address is unknown.

    A family matches when our address of that family is one of the resolved addresses
    (mtg's run-time rule: every known family must match).
    """
    v4, v6 = split_families(resolved)
    ipv4 = None if ours.ipv4 is None else of_family(ours.ipv4, 4) in v4
    ipv6 = None if ours.ipv6 is None else of_family(ours.ipv6, 6) in v6
    return ipv4, ipv6


async def startup_check(
    config: Config,
    resolver: Resolver,
    *,
    log: logging.Logger = _log,
    ssl_context: ssl.SSLContext | None = None,
) -> str:
    """The start-up SNI-DNS check of ``run``: log mtg's warning when something is off.

    Resolves the secret's host name with ``resolver`` (the proxy's configured one), takes
    our addresses from public-ipv4/public-ipv6 or the IP echo services (``[doctor]
    ip-echo-urls``, ``timeout``), and logs at warning level one of :data:`CANNOT_RESOLVE`
    (fields ``hostname``, ``error``), :data:`CANNOT_DETECT` or :data:`MISMATCH` (fields
    ``hostname``, ``resolved``, ``public_ip``, ``ipv4_match``/``ipv6_match``).
    Returns what happened (``"match"``, ``"mismatch"``, ``"cannot-resolve"``,
    ``"cannot-detect"``, ``"skipped"``, ``"failed"``); never raises except on cancellation.
    """
    host = config.secret.host
    if not host:
        return "skipped"
    try:
        try:
            resolved = await resolver.resolve(host)
        except OSError as exc:
            log.warning(CANNOT_RESOLVE, extra={"hostname": host, "error": str(exc)})
            return "cannot-resolve"
        ours = await public_addresses(
            config.public_ipv4,
            config.public_ipv6,
            echo_urls(config),
            config.doctor.timeout,
            ssl_context=ssl_context,
        )
        if ours.ipv4 is None and ours.ipv6 is None:
            log.warning(CANNOT_DETECT)
            return "cannot-detect"
        ipv4_match, ipv6_match = family_matches(resolved, ours)
        if ipv4_match is not False and ipv6_match is not False:
            return "match"
        fields: dict[str, str] = {
            "hostname": host,
            "resolved": ", ".join(resolved),
            "public_ip": "/".join(ip for ip in (ours.ipv4, ours.ipv6) if ip),
        }
        if ipv4_match is not None:
            fields["ipv4_match"] = "true" if ipv4_match else "false"
        if ipv6_match is not None:
            fields["ipv6_match"] = "true" if ipv6_match else "false"
        log.warning(MISMATCH, extra=fields)
        return "mismatch"
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug here must never take the worker down
        log.warning("SNI-DNS check failed", extra={"hostname": host, "error": repr(exc)})
        return "failed"
