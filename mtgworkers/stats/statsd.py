"""statsd observer: proxy events -> statsd lines over UDP, in mtg's formats.

Line shapes (mtg-compat.md c.3; the prefix is prepended verbatim, so the default
``mtg.`` gives ``mtg.client_connections`` and a configured ``mtg`` gives
``mtgclient_connections``, as in mtg)::

    datadog   mtg.telegram_traffic:30|c|#telegram_ip:10.1.0.10,dc:2,direction:to_client
    influxdb  mtg.telegram_traffic,telegram_ip=10.1.0.10,dc=2,direction=to_client:30|c
    graphite  mtg.telegram_traffic;telegram_ip=10.1.0.10;dc=2;direction=to_client:30|c

Connection gauges are sent as deltas (``+1|g`` / ``-1|g``), ``iplist_size`` as an
absolute gauge, everything else as counters (traffic with the byte count). Every line ends
with ``\\n``; lines are packed into datagrams of at most 1432 bytes, and a partly filled
datagram is sent at the latest 100 ms after its first line (a timer on the worker's
loop). Each worker sends its own lines: statsd sums deltas and counters from all of them.
Datagrams the kernel refuses (statsd down: ECONNREFUSED, full buffers) are counted and
reported at debug level once a minute, like mtg's statsd client.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, Final

from mtgworkers import events
from mtgworkers.stats.prometheus import FROM_CLIENT, TO_CLIENT, StatsError, ip_family

__all__ = ["FLUSH_INTERVAL", "MAX_PACKET", "StatsdObserver", "format_line"]

MAX_PACKET: Final = 1432
FLUSH_INTERVAL: Final = 0.1
LOST_REPORT_EVERY: Final = 60.0

_log = logging.getLogger("mtgworkers.statsd")

Tags = tuple[tuple[str, str], ...]


def format_line(
    prefix: str, name: str, value: str, kind: str, tags: Tags, tag_format: str
) -> bytes:
    """One statsd line (with its ``\\n``) in ``tag_format`` (datadog, influxdb, graphite).

    ``value`` is already formatted (``"+1"``, ``"-1"``, ``"30"``); ``kind`` is ``c`` or
    ``g``; ``tags`` are (name, value) pairs in mtg's order. Raises ValueError for an
    unknown tag format.
    """
    metric = prefix + name
    if not tags:
        text = f"{metric}:{value}|{kind}"
    elif tag_format == "datadog":
        text = f"{metric}:{value}|{kind}|#" + ",".join(f"{k}:{v}" for k, v in tags)
    elif tag_format == "influxdb":
        text = metric + "".join(f",{k}={v}" for k, v in tags) + f":{value}|{kind}"
    elif tag_format == "graphite":
        text = metric + "".join(f";{k}={v}" for k, v in tags) + f":{value}|{kind}"
    else:
        raise ValueError(f"unknown statsd tag format {tag_format!r}")
    return (text + "\n").encode()


class _Stream:
    __slots__ = ("family", "fronting", "telegram")

    def __init__(self, family: str) -> None:
        self.family = family
        self.telegram: Tags | None = None  # (telegram_ip, dc) tags once connected
        self.fronting = False


class StatsdObserver:
    """An :data:`~mtgworkers.events.Observer` sending mtg's statsd lines for one worker.

    ``host`` must be an IP literal (as in mtg's config); nothing goes through the SOCKS5
    proxies. Call :meth:`start` with the worker's loop for the 100 ms flushes and
    :meth:`close` at the end (it sends what is buffered). Raises :class:`StatsError` when
    the socket cannot be made.
    """

    def __init__(
        self,
        host: str,
        port: int,
        metric_prefix: str,
        tag_format: str,
        *,
        max_packet: int = MAX_PACKET,
        flush_interval: float = FLUSH_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if tag_format not in ("datadog", "influxdb", "graphite"):
            raise StatsError(f"unknown statsd tag format {tag_format!r}")
        self.prefix = metric_prefix
        self.tag_format = tag_format
        self.max_packet = max_packet
        self.flush_interval = flush_interval
        self.lost = 0  # datagrams the kernel refused, since the last report
        self.sent = 0  # datagrams sent
        self._clock = clock
        self._buf = bytearray()
        self._streams: dict[str, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_report = clock()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._sock: socket.socket | None = socket.socket(family, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
            self._sock.connect((host, port))
        except OSError as exc:
            raise StatsError(f"cannot set up statsd to {host}:{port}: {exc}") from exc
        self._handlers: dict[type, Callable[[Any], None]] = {
            events.EventStart: self._on_start,
            events.EventConnectedToDC: self._on_connected,
            events.EventDomainFronting: self._on_fronting,
            events.EventTraffic: self._on_traffic,
            events.EventFinish: self._on_finish,
            events.EventConcurrencyLimited: self._on_concurrency_limited,
            events.EventIPBlocklisted: self._on_ip_blocklisted,
            events.EventReplayAttack: self._on_replay_attack,
            events.EventIPListSize: self._on_iplist_size,
        }

    # -- Observer -------------------------------------------------------------------------

    def __call__(self, event: events.Event) -> None:
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush every ``flush_interval`` seconds on ``loop`` from now on."""
        self._loop = loop
        if self._timer is None:
            self._timer = loop.call_later(self.flush_interval, self._tick)

    def close(self) -> None:
        """Send what is buffered, stop the timer, close the socket."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._streams.clear()

    def flush(self) -> None:
        """Send the buffered lines now (one datagram)."""
        if self._buf:
            self._send()

    # -- sending --------------------------------------------------------------------------

    def _tick(self) -> None:
        self.flush()
        if self.lost:
            now = self._clock()
            if now - self._last_report >= LOST_REPORT_EVERY:
                _log.debug("statsd packets lost", extra={"lost": self.lost})
                self.lost = 0
                self._last_report = now
        if self._loop is not None:
            self._timer = self._loop.call_later(self.flush_interval, self._tick)

    def _send(self) -> None:
        data = bytes(self._buf)
        self._buf.clear()
        sock = self._sock
        if sock is None:
            return
        try:
            sock.send(data)
            self.sent += 1
        except OSError:  # ECONNREFUSED from an earlier datagram, EAGAIN, ENOBUFS
            self.lost += 1

    def _emit(self, name: str, value: str, kind: str, tags: Tags = ()) -> None:
        line = format_line(self.prefix, name, value, kind, tags, self.tag_format)
        if self._buf and len(self._buf) + len(line) > self.max_packet:
            self._send()
        self._buf += line

    # -- events ---------------------------------------------------------------------------

    def _on_start(self, event: events.EventStart) -> None:
        family = ip_family(event.client_ip)
        self._streams[event.stream_id] = _Stream(family)
        self._emit("client_connections", "+1", "g", (("ip_family", family),))

    def _on_connected(self, event: events.EventConnectedToDC) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.telegram is not None:
            return
        stream.telegram = (("telegram_ip", event.remote_ip), ("dc", str(event.dc)))
        self._emit("telegram_connections", "+1", "g", stream.telegram)

    def _on_fronting(self, event: events.EventDomainFronting) -> None:
        self._emit("domain_fronting", "1", "c")
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.fronting:
            return
        stream.fronting = True
        self._emit("domain_fronting_connections", "+1", "g", (("ip_family", stream.family),))

    def _on_traffic(self, event: events.EventTraffic) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or event.traffic <= 0:
            return
        direction = ("direction", TO_CLIENT if event.is_read else FROM_CLIENT)
        if stream.telegram is not None:
            self._emit("telegram_traffic", str(event.traffic), "c", (*stream.telegram, direction))
        elif stream.fronting:
            self._emit("domain_fronting_traffic", str(event.traffic), "c", (direction,))

    def _on_finish(self, event: events.EventFinish) -> None:
        stream = self._streams.pop(event.stream_id, None)
        if stream is None:
            return
        self._emit("client_connections", "-1", "g", (("ip_family", stream.family),))
        if stream.telegram is not None:
            self._emit("telegram_connections", "-1", "g", stream.telegram)
        if stream.fronting:
            self._emit("domain_fronting_connections", "-1", "g", (("ip_family", stream.family),))

    def _on_concurrency_limited(self, event: events.EventConcurrencyLimited) -> None:
        self._emit("concurrency_limited", "1", "c")

    def _on_ip_blocklisted(self, event: events.EventIPBlocklisted) -> None:
        ip_list = "blocklist" if event.is_blocklist else "allowlist"
        self._emit("ip_blocklisted", "1", "c", (("ip_list", ip_list),))

    def _on_replay_attack(self, event: events.EventReplayAttack) -> None:
        self._emit("replay_attacks", "1", "c")

    def _on_iplist_size(self, event: events.EventIPListSize) -> None:
        ip_list = "blocklist" if event.is_blocklist else "allowlist"
        self._emit("iplist_size", str(event.size), "g", (("ip_list", ip_list),))
