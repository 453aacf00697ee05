"""Keeps an IP allow/blocklist fresh: read every source, build one IPList, swap it in.

See docs/protocol.md §9.

An :class:`IPListUpdater` belongs to one list (``blocklist`` or ``allowlist``). Each round
reads all sources of ``[defense.<name>].urls`` at the same time (mtg ignores
``download-concurrency``, and so do we): a local file from disk, an ``http(s)://`` URL
through the ``fetch_url`` callable the caller gives (normally
:func:`mtgworkers.net.http.url_fetcher` over the SOCKS-aware dialer). The netsets are
parsed, everything is merged into one :class:`~mtgworkers.defense.iplist.IPList`, and
``on_update`` receives it.

A source that cannot be read contributes nothing and is logged as ``update has failed``;
the round still completes, as in mtg. Unparsable lines of a source are skipped (mtg drops
everything from the first one on) and logged once per source and round, as ``ip list has
bad lines; they were skipped`` with their count and the first of them. Parsing and
building run in a worker thread so that a large list does not stall the event loop that
relays traffic.

Log messages and logger names are mtg's (docs/mtg-compat.md d.4), including the misspelt
``ipblockist``; the bad-lines warning is ours.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from mtgworkers.defense.iplist import BadLines, IPList, Network, parse_netset
from mtgworkers.logs import error_text, get_logger
from mtgworkers.net.http import redact_url

if TYPE_CHECKING:
    from mtgworkers.config import IPListConfig

__all__ = ["LIST_NAMES", "IPListUpdater"]

LIST_NAMES = ("blocklist", "allowlist")

# A zero or negative period would turn run() into a busy loop; config validation should
# never let one through, this is the last line of defence.
_MIN_PERIOD = 0.001


def is_url(source: str) -> bool:
    """True for an ``http://``/``https://`` source, False for a file path."""
    return urlsplit(source).scheme.lower() in ("http", "https")


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OSError(f"cannot read {path}: {reason[:1].lower()}{reason[1:]}") from None


def _parse(data: bytes) -> tuple[list[Network], BadLines | None]:
    # Undecodable bytes become U+FFFD: in a comment they do no harm, in an entry the line
    # fails to parse, which is what Go's byte-wise parser does with them too.
    return parse_netset(data.decode("utf-8", errors="replace"))


class IPListUpdater:
    """Builds the allowlist or blocklist from its sources, once or periodically."""

    def __init__(
        self,
        name: str,
        cfg: IPListConfig,
        *,
        fetch_url: Callable[[str], Awaitable[bytes]],
        on_update: Callable[[IPList], None],
    ) -> None:
        """``name``: ``"blocklist"`` or ``"allowlist"`` (the logger and messages follow it).
        ``cfg``: the list's config section (``urls`` and ``update_each`` are used).
        ``fetch_url(url)``: the body of ``url``, raising on failure (status >= 400
        included). ``on_update(iplist)``: called with every freshly built list.

        Raises ValueError for another ``name``.
        """
        if name not in LIST_NAMES:
            raise ValueError(f"unknown IP list {name!r}: expected one of {', '.join(LIST_NAMES)}")
        self.name = name
        self._cfg = cfg
        self._fetch_url = fetch_url
        self._on_update = on_update
        self._log = get_logger(f"{name}.ipblockist.firehol")
        self.current: IPList | None = None  # the last list handed to on_update

    async def update_once(self) -> IPList:
        """Read every source (in parallel), build the new list, hand it to ``on_update``
        and return it.

        Failing sources are logged and contribute what they had; so this raises only
        what ``on_update`` raises (and CancelledError).
        """
        parts = await asyncio.gather(*(self._read(source) for source in self._cfg.urls))
        networks = [network for part in parts for network in part]
        iplist = await asyncio.to_thread(IPList, networks)
        self.current = iplist
        self._on_update(iplist)
        self._log.info("ip list was updated")
        return iplist

    async def run(self) -> None:
        """Update now, then every ``update_each`` seconds after the previous round ended.

        Never returns; never raises except CancelledError (an unexpected failure of a
        round is logged at error level and the next round comes as planned).
        """
        period = max(self._cfg.update_each, _MIN_PERIOD)
        while True:
            try:
                await self.update_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # on_update or a bug: the next round may do better
                self._log.error("update has failed", extra={"error": error_text(exc)}, exc_info=exc)
            await asyncio.sleep(period)

    async def _read(self, source: str) -> list[Network]:
        """Networks of one source; never raises except CancelledError."""
        try:
            if is_url(source):
                data = await self._fetch_url(source)
            else:
                data = await asyncio.to_thread(_read_file, source)
            networks, bad = await asyncio.to_thread(_parse, data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of one source must not spoil the round
            self._failed(source, error_text(exc))
            return []
        if bad is not None:
            self._log.warning(
                "ip list has bad lines; they were skipped",
                extra={
                    "filename_": redact_url(source),
                    "bad_lines": bad.count,
                    "first_bad_line": bad.first_line,
                    "error": str(bad),
                },
            )
        return networks

    def _failed(self, source: str, error: str) -> None:
        # "filename" is a reserved LogRecord attribute and cannot be passed in extra=, so
        # the field travels as "filename_"; the JSON formatter is to print it under mtg's
        # name "filename".
        self._log.warning(
            "update has failed", extra={"filename_": redact_url(source), "error": error}
        )
