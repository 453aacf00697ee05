"""statsd observer: proxy events -> statsd lines over UDP, in mtg's formats.

Line shapes (docs/mtg-compat.md c.3; the prefix is prepended verbatim, so the default
``mtg.`` gives ``mtg.client_connections`` and a configured ``mtg`` gives
``mtgclient_connections``, as in mtg)::

    datadog   mtg.telegram_traffic:30|c|#telegram_ip:10.1.0.10,dc:2,direction:to_client
    influxdb  mtg.telegram_traffic,telegram_ip=10.1.0.10,dc=2,direction=to_client:30|c
    graphite  mtg.telegram_traffic;telegram_ip=10.1.0.10;dc=2;direction=to_client:30|c

Connection gauges are sent as deltas (``+1|g`` / ``-1|g``), ``iplist_size`` as an
absolute gauge, everything else as counters (traffic with the byte count); besides mtg's
metrics, ``accept_refused`` (tagged ``reason``, see :mod:`mtgworkers.fdguard`),
``client_hellos_without_sni`` and ``concurrency_evicted`` (see :mod:`mtgworkers.admission`)
are ours.
Every line ends with ``\\n``; lines are packed into datagrams of at most 1432 bytes, and a
partly filled datagram is sent at the latest 100 ms after its first line (a timer on the
worker's loop). Each worker sends its own lines: statsd sums deltas and counters from all
of them. Datagrams the kernel refuses (statsd down: ECONNREFUSED, full buffers) are counted and
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
from mtgworkers.netaddr import join_host_port
from mtgworkers.stats.prometheus import FROM_CLIENT, TO_CLIENT, StatsError, ip_family

__all__ = ["FLUSH_INTERVAL", "MAX_PACKET", "StatsdObserver", "format_line", "render_tags"]

MAX_PACKET: Final = 1432
FLUSH_INTERVAL: Final = 0.1
LOST_REPORT_EVERY: Final = 60.0

_log = logging.getLogger("mtgworkers.statsd")

Tags = tuple[tuple[str, str], ...]


def render_tags(tags: Tags, tag_format: str) -> str:
    """The tag part of a line: ``|#k:v,k:v`` (datadog), ``,k=v,k=v`` (influxdb),
    ``;k=v;k=v`` (graphite), ``""`` without tags. Raises ValueError for another format."""
    if tag_format == "datadog":
        return "|#" + ",".join(f"{k}:{v}" for k, v in tags) if tags else ""
    if tag_format == "influxdb":
        return "".join(f",{k}={v}" for k, v in tags)
    if tag_format == "graphite":
        return "".join(f";{k}={v}" for k, v in tags)
    raise ValueError(f"unknown statsd tag format {tag_format!r}")


def format_line(
    prefix: str, name: str, value: str, kind: str, tags: Tags, tag_format: str
) -> bytes:
    """One statsd line (with its ``\\n``) in ``tag_format`` (datadog, influxdb, graphite).

    ``value`` is already formatted (``"+1"``, ``"-1"``, ``"30"``); ``kind`` is ``c`` or
    ``g``; ``tags`` are (name, value) pairs in mtg's order. Raises ValueError for an
    unknown tag format.
    """
    return _line(prefix + name, value, kind, render_tags(tags, tag_format), tag_format)


def _line(metric: str, value: str, kind: str, tag_text: str, tag_format: str) -> bytes:
    if tag_format == "datadog":
        return f"{metric}:{value}|{kind}{tag_text}\n".encode()
    return f"{metric}{tag_text}:{value}|{kind}\n".encode()


class _Stream:
    __slots__ = ("family", "fronting", "telegram")

    def __init__(self, family: str) -> None:
        self.family = family  # rendered ip_family tag
        self.telegram: tuple[str, str, str] | None = None  # rendered tags once connected:
        # (telegram_ip+dc, ...+to_client, ...+from_client)
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
        self._tag_cache: dict[tuple[tuple[str, str], ...], str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_report = clock()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._sock: socket.socket | None = socket.socket(family, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
            self._sock.connect((host, port))
        except OSError as exc:
            address = join_host_port(host, port)
            raise StatsError(f"cannot set up statsd to {address}: {exc}") from exc
        self._handlers: dict[type, Callable[[Any], None]] = {
            events.EventStart: self._on_start,
            events.EventConnectedToDC: self._on_connected,
            events.EventDomainFronting: self._on_fronting,
            events.EventTraffic: self._on_traffic,
            events.EventFinish: self._on_finish,
            events.EventConcurrencyLimited: self._on_concurrency_limited,
            events.EventConcurrencyEvicted: self._on_concurrency_evicted,
            events.EventIPBlocklisted: self._on_ip_blocklisted,
            events.EventReplayAttack: self._on_replay_attack,
            events.EventIPListSize: self._on_iplist_size,
            events.EventAcceptRefused: self._on_accept_refused,
            events.EventHelloWithoutSNI: self._on_hello_without_sni,
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

    def _emit(self, name: str, value: str, kind: str, tag_text: str = "") -> None:
        line = _line(self.prefix + name, value, kind, tag_text, self.tag_format)
        if self._buf and len(self._buf) + len(line) > self.max_packet:
            self._send()
        self._buf += line

    def _tags(self, *tags: tuple[str, str]) -> str:
        """Rendered tags, cached (label values are few: families, DC addresses, lists)."""
        text = self._tag_cache.get(tags)
        if text is None:
            if len(self._tag_cache) > 10_000:
                self._tag_cache.clear()
            text = self._tag_cache[tags] = render_tags(tags, self.tag_format)
        return text

    # -- events ---------------------------------------------------------------------------

    def _on_start(self, event: events.EventStart) -> None:
        family = self._tags(("ip_family", ip_family(event.client_ip)))
        self._streams[event.stream_id] = _Stream(family)
        self._emit("client_connections", "+1", "g", family)

    def _on_connected(self, event: events.EventConnectedToDC) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.telegram is not None:
            return
        ip, dc = ("telegram_ip", event.remote_ip), ("dc", str(event.dc))
        stream.telegram = (
            self._tags(ip, dc),
            self._tags(ip, dc, ("direction", TO_CLIENT)),
            self._tags(ip, dc, ("direction", FROM_CLIENT)),
        )
        self._emit("telegram_connections", "+1", "g", stream.telegram[0])

    def _on_fronting(self, event: events.EventDomainFronting) -> None:
        self._emit("domain_fronting", "1", "c")
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.fronting:
            return
        stream.fronting = True
        self._emit("domain_fronting_connections", "+1", "g", stream.family)

    def _on_traffic(self, event: events.EventTraffic) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or event.traffic <= 0:
            return
        if stream.telegram is not None:
            tags = stream.telegram[1] if event.is_read else stream.telegram[2]
            self._emit("telegram_traffic", str(event.traffic), "c", tags)
        elif stream.fronting:
            direction = TO_CLIENT if event.is_read else FROM_CLIENT
            tags = self._tags(("direction", direction))
            self._emit("domain_fronting_traffic", str(event.traffic), "c", tags)

    def _on_finish(self, event: events.EventFinish) -> None:
        stream = self._streams.pop(event.stream_id, None)
        if stream is None:
            return
        self._emit("client_connections", "-1", "g", stream.family)
        if stream.telegram is not None:
            self._emit("telegram_connections", "-1", "g", stream.telegram[0])
        if stream.fronting:
            self._emit("domain_fronting_connections", "-1", "g", stream.family)

    def _on_concurrency_limited(self, event: events.EventConcurrencyLimited) -> None:
        self._emit("concurrency_limited", "1", "c")

    def _on_concurrency_evicted(self, event: events.EventConcurrencyEvicted) -> None:
        # ours, not mtg's
        self._emit("concurrency_evicted", "1", "c", self._tags())

    def _on_ip_blocklisted(self, event: events.EventIPBlocklisted) -> None:
        ip_list = "blocklist" if event.is_blocklist else "allowlist"
        self._emit("ip_blocklisted", "1", "c", self._tags(("ip_list", ip_list)))

    def _on_replay_attack(self, event: events.EventReplayAttack) -> None:
        self._emit("replay_attacks", "1", "c")

    def _on_iplist_size(self, event: events.EventIPListSize) -> None:
        ip_list = "blocklist" if event.is_blocklist else "allowlist"
        self._emit("iplist_size", str(event.size), "g", self._tags(("ip_list", ip_list)))

    def _on_hello_without_sni(self, event: events.EventHelloWithoutSNI) -> None:
        # ours, not mtg's
        self._emit("client_hellos_without_sni", "1", "c", self._tags())

    def _on_accept_refused(self, event: events.EventAcceptRefused) -> None:
        # ours, not mtg's
        self._emit("accept_refused", "1", "c", self._tags(("reason", event.reason)))
