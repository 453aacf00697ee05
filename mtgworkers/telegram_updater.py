"""``auto-update``: learn extra DC 203 addresses from Telegram's getProxyConfig.

See docs/protocol.md §5.4.

Telegram publishes its middle-proxy endpoints at ``getProxyConfig`` (IPv4) and
``getProxyConfigV6`` (IPv6), one ``proxy_for <dc> <host:port>;`` line each. mtg reads both
lists every hour and keeps only the DC 203 (CDN) entries, which it tries after its
built-in DC 203 address; so do we.

:func:`parse_proxy_config` is the pure part (text in, entries out). A
:class:`PublicConfigUpdater` runs the two periodic downloads and hands each family's new
list to ``on_update`` — normally :meth:`mtgworkers.dcs.DCTable.set_auto_addresses`. A
failed round keeps the previous list; a successful one replaces it, even by an empty one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable

from mtgworkers.logs import error_text, get_logger
from mtgworkers.netaddr import join_host_port

__all__ = [
    "DEFAULT_URLS",
    "UPDATED_DC",
    "PublicConfigUpdater",
    "parse_proxy_config",
]

DEFAULT_URLS = (
    "https://core.telegram.org/getProxyConfig",
    "https://core.telegram.org/getProxyConfigV6",
)
UPDATED_DC = 203
UPDATE_EVERY = 3600.0

# mtg's expression ^\s*proxy_for\s+(\d+)\s+(\S+?)?;\s*$ with Go's classes spelt out:
# there \s is [\t\n\f\r ] and \d is [0-9], no Unicode spaces or digits (nor \v).
_LINE = re.compile(
    r"^[\t\n\f\r ]*proxy_for[\t\n\f\r ]+([0-9]+)[\t\n\f\r ]+([^\t\n\f\r ]+?)?;[\t\n\f\r ]*\Z"
)
# Go's strconv.Atoi on 64 bits: longer numbers do not parse, and such a line is skipped.
_MAX_DC_DIGITS = 18

Addresses = tuple[tuple[str, int], ...]

_log = get_logger("proxy.telegram-updaters.public-config")


def _split_address(token: str) -> tuple[str, int] | None:
    """``a.b.c.d:port`` / ``[v6]:port`` -> (canonical IP, port); None if it is neither."""
    host, sep, port_text = token.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        return None
    port = int(port_text)
    if not 0 < port < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            return None
    elif ":" in host:
        return None  # an IPv6 address needs brackets before a port
    if "%" in host:
        return None  # zone ids mean nothing for a remote address
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        return None


def parse_proxy_config(text: str) -> list[tuple[int, str, int]]:
    """The ``(dc, ip, port)`` entries of a getProxyConfig answer, in the order given.

    A line counts only if it matches ``^\\s*proxy_for\\s+(\\d+)\\s+(\\S+?)?;\\s*$`` and its
    address is an IP literal with a port (``149.154.175.50:8888``,
    ``[2001:b28:f23d:f001::d]:8888``); everything else (comments, ``default``, other
    options, malformed lines) is skipped. IPs come back in canonical text form. Never
    raises.
    """
    entries: list[tuple[int, str, int]] = []
    for line in text.split("\n"):
        match = _LINE.match(line)
        if match is None or match.group(2) is None:
            continue
        dc_text = match.group(1)
        if len(dc_text.lstrip("0")) > _MAX_DC_DIGITS:
            continue
        address = _split_address(match.group(2))
        if address is not None:
            entries.append((int(dc_text), *address))
    return entries


def _family_of(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


class PublicConfigUpdater:
    """Periodically refreshes the auto-updated DC 203 addresses of both families."""

    def __init__(
        self,
        *,
        fetch_url: Callable[[str], Awaitable[bytes]],
        on_update: Callable[[int, Addresses], None],
        urls: tuple[str, str] = DEFAULT_URLS,
        every: float = UPDATE_EVERY,
    ) -> None:
        """``fetch_url(url)``: the body of ``url``, raising on failure (status >= 400
        included). ``on_update(family, addresses)``: ``family`` is ``socket.AF_INET`` or
        ``AF_INET6``, ``addresses`` the new ``(ip, port)`` list of DC 203 for it.
        ``urls``: the IPv4 and the IPv6 list. ``every``: seconds between rounds.

        Raises ValueError for a non-positive ``every``.
        """
        if not every > 0:
            raise ValueError(f"update period must be positive, not {every!r}")
        self._fetch_url = fetch_url
        self._on_update = on_update
        self._urls: dict[int, str] = {socket.AF_INET: urls[0], socket.AF_INET6: urls[1]}
        self._every = every

    async def update(self, family: int) -> bool:
        """One round for ``family``: download, parse, hand the DC 203 list to on_update.

        Returns True when on_update got a new list, False when the download or its
        decoding failed (logged as ``cannot update``; the previous list stays). Raises
        only what on_update raises, CancelledError, and ValueError for an unknown family.
        """
        url = self._urls.get(family)
        if url is None:
            raise ValueError(f"unsupported address family {family!r}")
        _log.info("start update")
        try:
            body = await self._fetch_url(url)
            entries = parse_proxy_config(body.decode("utf-8", errors="replace"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever went wrong, the current list stays usable
            _log.warning("cannot update", extra={"error": error_text(exc)})
            return False
        addresses = tuple(
            (ip, port)
            for dc, ip, port in entries
            # An address of the other family would defeat prefer-ip / only-ipv*.
            if dc == UPDATED_DC and _family_of(ip) == family
        )
        for ip, port in addresses:
            _log.info(f"found {join_host_port(ip, port)} address for DC {UPDATED_DC}")
        self._on_update(family, addresses)
        _log.info("updated")
        return True

    async def run(self) -> None:
        """Update both families now and then every ``every`` seconds, until cancelled.

        Never raises except CancelledError; logs ``stop updating`` when it ends.
        """
        await asyncio.gather(self._loop(socket.AF_INET), self._loop(socket.AF_INET6))

    async def _loop(self, family: int) -> None:
        try:
            while True:
                try:
                    await self.update(family)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # on_update failed: try again next round
                    _log.error("cannot update", extra={"error": error_text(exc)}, exc_info=exc)
                await asyncio.sleep(self._every)
        finally:
            _log.info("stop updating")
