"""The session orchestrator: everything that happens to one accepted client connection.

This is the only place where a client session is put together; the layers it composes
(PROXY protocol, FakeTLS, obfuscated2, DC choice, dialer, relay) know nothing about each
other. The order of operations and the failure routing follow mtg (see docs/protocol.md §0):

    accept -> [PROXY header] -> allowlist/blocklist -> concurrency gate -> ClientHello
      -> anti-replay -> ServerHello -> obfuscated2 frame -> dial DC -> relay
    any ClientHello failure or a replayed hello -> domain fronting (replay the bytes read)

``ClientSession`` is the client transport's protocol during the handshake. Once the
upstream is connected the client transport is handed to a relay side protocol
(``relay.ClientSide`` or ``relay.RawSide``) with ``transport.set_protocol``; the session
object stays as the shared state of the pair (activity flag, traffic counters, closing).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
from typing import TYPE_CHECKING, Any

from mtgworkers import events
from mtgworkers.protocol import faketls, obfs2, proxyproto
from mtgworkers.protocol.errors import ProtocolError
from mtgworkers.relay import ClientSide, DRSTelegramSide, RawSide, Side, TelegramSide

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from mtgworkers.server import FrontingKey, Worker

# session states
PROXY_HEADER = 0  # waiting for an optional PROXY protocol header
HELLO = 1  # reading the FakeTLS ClientHello
OBFS2 = 2  # reading the 64-byte obfuscated2 frame inside TLS records
DIALING = 3  # connecting to a DC or to the fronting host; client reading paused
RELAY = 4  # both transports up, bytes flowing
CLOSING = 5  # transports closing (flushing), waiting for connection_lost
CLOSED = 6

# A ClientHello may span at most 11 records of at most 65535 bytes each (mtg's limits).
_MAX_HELLO_BYTES = 11 * (5 + 0xFFFF)
# Bytes buffered from a client while its fronting connection is being dialled.
_MAX_FRONT_BUFFER = 1 << 20

_log = logging.getLogger("mtgworkers.proxy")
_relay_log = logging.getLogger("mtgworkers.proxy.relay")
_front_log = logging.getLogger("mtgworkers.proxy.domain-fronting")


def _records_end(buf: bytearray | bytes, start: int) -> int:
    """Return the buffer length at which the next TLS record starting at ``start`` ends.

    Used to skip re-parsing an incomplete ClientHello on every tiny chunk.
    """
    pos = start
    while True:
        if len(buf) < pos + 5:
            return pos + 5
        end = pos + 5 + int.from_bytes(buf[pos + 3 : pos + 5], "big")
        if len(buf) < end:
            return end
        pos = end


class ClientSession(asyncio.Protocol):
    """Protocol of an accepted client connection; orchestrates its whole life."""

    __slots__ = (
        "_hello_need",
        "_open_transports",
        "_task",
        "_timer",
        "buf",
        "bytes_from_client",
        "bytes_to_client",
        "client_addr",
        "closing_since",
        "dc",
        "front_key",
        "fronted",
        "last_active",
        "reader",
        "started",
        "state",
        "stream_id",
        "touched",
        "transport",
        "upstream",
        "upstream_ip",
        "worker",
    )

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.state = PROXY_HEADER
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.upstream_ip = ""
        self.buf = bytearray()
        self.reader: faketls.RecordReader | None = None
        self.client_addr: tuple[str, int] = ("", 0)
        self.stream_id = ""
        self.started = False  # counted against concurrency, start event sent
        self.fronted = False
        self.front_key: FrontingKey | None = None
        self.dc = 0
        self.touched = False
        self.last_active = 0.0
        self.closing_since = 0.0
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self._open_transports = 0
        self._hello_need = 5
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        worker = self.worker
        worker.accepted(self)
        self.transport = transport  # type: ignore[assignment]
        self._open_transports = 1
        peer = transport.get_extra_info("peername")
        if not peer:
            # Reset while it waited in the accept queue (port scanners, some health checks):
            # there is no client to admit, count or front.
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug("connection was reset before it was accepted")
            self._abort()
            return
        self.client_addr = (_normalise_ip(peer[0]), peer[1])
        self._timer = worker.loop.call_later(worker.handshake_timeout, self._handshake_timeout)
        if worker.proxy_protocol_listener:
            return  # the client address is known only after the PROXY header
        self._admit()

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == HELLO:
            self._hello_data(data)
        elif state == OBFS2:
            self._obfs2_data(data)
        elif state == PROXY_HEADER:
            self._proxy_header_data(data)
        elif state == DIALING and self.fronted:
            self.buf += data
            if len(self.buf) > _MAX_FRONT_BUFFER:
                self.transport.pause_reading()  # type: ignore[union-attr]
        # In other states data is not expected (reading is paused); drop it.

    def eof_received(self) -> bool:
        # A client that half-closes before the handshake is done has nothing more to say.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport_lost()

    # -- admission ------------------------------------------------------------------------

    def _admit(self) -> None:
        worker = self.worker
        ip = self.client_addr[0]
        reason = worker.check_ip(ip)
        if reason is not None:
            self.close()
            return
        if not worker.limiter.try_acquire():
            if _log.isEnabledFor(logging.INFO):
                _log.info("connection was concurrency limited", extra={"ip": ip})
            worker.events.send(events.EventConcurrencyLimited())
            self.close()
            return
        self.started = True
        self.stream_id = base64.urlsafe_b64encode(worker.random_bytes(16)).rstrip(b"=").decode()
        worker.events.send(events.EventStart(self.stream_id, ip))
        if _log.isEnabledFor(logging.INFO):
            _log.info("Stream has been started", extra=self._fields())
        self.state = HELLO
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            self._hello_data(data)

    def _proxy_header_data(self, data: bytes) -> None:
        self.buf += data
        try:
            parsed = proxyproto.parse_header(self.buf)
        except ProtocolError as exc:
            _log.info("cannot parse proxy protocol header", extra={"error": str(exc)})
            self.close()
            return
        if parsed is None:
            return
        if parsed is not proxyproto.NOT_PROXY:
            header, consumed = parsed
            ip = self.client_addr[0]
            if not self.worker.proxy_header_allowed(ip):
                _log.info(
                    "proxy protocol header from an untrusted address",
                    extra={"ip": ip, "error": "the address is not in proxy-protocol-trusted"},
                )
                self.close()
                return
            if header.local:
                # A balancer's own connection (HAProxy's health checks send PROXY v2 LOCAL)
                # or one it cannot attribute (v1 UNKNOWN): nobody to serve.
                if _log.isEnabledFor(logging.DEBUG):
                    _log.debug("proxy protocol header without a client (LOCAL or UNKNOWN)")
                self.close()
                return
            del self.buf[:consumed]
            if header.src is not None:
                self.client_addr = (_normalise_ip(header.src[0]), header.src[1])
        self._admit()

    # -- FakeTLS --------------------------------------------------------------------------

    def _hello_data(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if len(buf) < self._hello_need:
            return
        try:
            result = faketls.read_client_hello(buf)
            if result is None:
                if len(buf) > _MAX_HELLO_BYTES:
                    raise faketls.TLSError("client hello is too large")
                self._hello_need = _records_end(buf, 0)
                return
            hello, consumed = result
            worker = self.worker
            faketls.verify_client_hello(
                hello, worker.secret, worker.clock(), worker.tolerate_time_skewness
            )
        except ProtocolError as exc:
            if _log.isEnabledFor(logging.INFO):
                _log.info("cannot read client hello", extra={"error": str(exc)})
            self._start_fronting()
            return

        if worker.replay_filter.test_and_add(hello.session_id):
            _log.warning("replay attack has been detected!")
            worker.events.send(events.EventReplayAttack(self.stream_id))
            self._start_fronting()
            return

        try:
            welcome = faketls.build_server_hello(
                hello, worker.secret.key, urandom=worker.random_bytes
            )
            self.transport.write(welcome)  # type: ignore[union-attr]
        except Exception as exc:  # a transport in error state
            _log.info("cannot send welcome packet", extra={"error": str(exc)})
            self.close()
            return
        rest = bytes(buf[consumed:])
        self.buf = bytearray()
        self.reader = faketls.RecordReader()
        self.state = OBFS2
        if rest:
            self._obfs2_data(rest)

    # -- obfuscated2 ----------------------------------------------------------------------

    def _obfs2_data(self, data: bytes) -> None:
        try:
            payloads = self.reader.feed(data)  # type: ignore[union-attr]
        except ProtocolError as exc:
            self._obfs2_failed(f"cannot read frame: {exc}")
            return
        buf = self.buf
        for payload in payloads:
            buf += payload
        if len(buf) < obfs2.FRAME_LEN:
            return
        try:
            handshake = obfs2.parse_client_frame(
                bytes(buf[: obfs2.FRAME_LEN]), self.worker.secret.key
            )
        except ProtocolError as exc:
            self._obfs2_failed(str(exc))
            return
        pending = bytes(buf[obfs2.FRAME_LEN :])
        self.buf = bytearray()
        self._cancel_timer()  # mtg clears the handshake deadline before dialling Telegram
        self.state = DIALING
        self.transport.pause_reading()  # type: ignore[union-attr]
        self._task = asyncio.ensure_future(
            self._guarded(self._connect_telegram(handshake, pending))
        )

    def _obfs2_failed(self, error: str) -> None:
        if _log.isEnabledFor(logging.INFO):
            _log.info(
                "obfuscated handshake is failed",
                extra=self._fields(error=f"cannot process client handshake: {error}"),
            )
        self.close()

    # -- Telegram -------------------------------------------------------------------------

    async def _connect_telegram(self, handshake: obfs2.ClientHandshake, pending: bytes) -> None:
        worker = self.worker
        original_dc = obfs2.dc_number(handshake.dc)
        dc = original_dc
        self.dc = dc
        addresses = worker.dc_table.addresses(dc, worker.prefer_ip)
        if not addresses:
            if not worker.allow_fallback_on_unknown_dc:
                _log.warning(
                    "cannot dial to telegram",
                    extra=self._fields(dc=dc, error=f"no available addresses for DC {dc}"),
                )
                self.close()
                return
            _log.warning("unknown DC, fallbacks", extra=self._fields(dc=dc, original_dc=dc))
            dc = 2
            self.dc = dc
            addresses = worker.dc_table.addresses(dc, worker.prefer_ip)

        sock: socket.socket | None = None
        last_error: BaseException | None = None
        for host, port in addresses:
            try:
                sock = await worker.dialer.open_socket(host, port)
            except OSError as exc:
                last_error = exc
                continue
            break
        if sock is None:
            fields = self._fields(dc=dc, error=f"no addresses to call: {last_error}")
            if dc != original_dc:
                fields["original_dc"] = original_dc
            _log.warning("cannot dial to telegram", extra=fields)
            self.close()
            return
        if self.state != DIALING:  # the client went away while we were dialling
            sock.close()
            return

        frame, dc_encryptor, dc_decryptor = obfs2.generate_dc_frame(
            dc, handshake.tag, urandom=worker.random_bytes
        )
        client_transport = self.transport
        assert client_transport is not None
        side_class = DRSTelegramSide if worker.drs else TelegramSide
        dc_side = side_class(
            self, client_transport, dc_decryptor.update, handshake.encryptor.update
        )
        try:
            peer = sock.getpeername()
            upstream, _ = await worker.loop.create_connection(lambda: dc_side, sock=sock)
        except OSError as exc:
            sock.close()
            _log.warning(
                "cannot dial to telegram",
                extra=self._fields(dc=dc, error=f"cannot perform server handshake: {exc}"),
            )
            self.close()
            return
        if self.state != DIALING:
            upstream.abort()
            return
        self._attach_upstream(upstream)
        self.upstream_ip = _normalise_ip(peer[0])
        reader = self.reader
        assert reader is not None
        client_side = ClientSide(
            self, upstream, reader, handshake.decryptor.update, dc_encryptor.update
        )
        upstream.write(frame)
        if pending:
            # Bytes the client sent right behind its frame: still encrypted for the client
            # stream, so they take the normal relay path.
            out = dc_encryptor.update(handshake.decryptor.update(pending))
            self.bytes_from_client += len(out)
            upstream.write(out)
        worker.events.send(events.EventConnectedToDC(self.stream_id, self.upstream_ip, dc))
        self._start_relay(client_side)

    async def _guarded(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a dial coroutine; a bug in it must cost this session only, never the worker."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.error("session failed", extra=self._fields(error=repr(exc)), exc_info=exc)
            self._abort()
        finally:
            self._task = None  # a finished task would stay referenced for the whole session

    # -- domain fronting ------------------------------------------------------------------

    def _start_fronting(self) -> None:
        transport = self.transport
        assert transport is not None
        if self.worker.is_own_fronting_connection(
            transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        ):
            # Our own fronting dial came back to us: the fronting host is this proxy. Checked
            # here, not at accept: the dial is registered before it sends a byte, but its
            # accept may run first.
            _log.error(
                "fronting host loops back to this proxy; closing the looped connection",
                extra={"ip": self.client_addr[0]},
            )
            self.close()
            return
        self.fronted = True
        self._cancel_timer()  # from now on the relay's idle timeout applies
        self.state = DIALING
        self.worker.events.send(events.EventDomainFronting(self.stream_id))
        self._task = asyncio.ensure_future(self._guarded(self._connect_front()))

    async def _connect_front(self) -> None:
        worker = self.worker
        host, port = worker.fronting_address
        try:
            sock = await worker.dialer.open_socket(host, port, use_proxies=False)
        except OSError as exc:
            _log.warning("cannot dial to the fronting domain", extra={"error": str(exc)})
            self.close()
            return
        if self.state != DIALING:
            sock.close()
            return
        try:
            peer = sock.getpeername()
            if worker.is_own_listener(peer):
                sock.close()
                _log.error(
                    "cannot dial to the fronting domain",
                    extra={"error": f"{peer[0]}:{peer[1]} is this proxy itself (fronting loop)"},
                )
                self.close()
                return
            self.front_key = worker.fronting_dialled(sock)
            client_transport = self.transport
            front_side = RawSide(self, client_transport, upstream=True)
            upstream, _ = await worker.loop.create_connection(lambda: front_side, sock=sock)
        except OSError as exc:
            sock.close()
            _log.warning("cannot dial to the fronting domain", extra={"error": str(exc)})
            self.close()
            return
        if self.state != DIALING:
            upstream.abort()
            return
        self._attach_upstream(upstream)
        self.upstream_ip = _normalise_ip(peer[0])
        if worker.fronting_proxy_protocol:
            upstream.write(proxyproto.build_v2(self.client_addr, (peer[0], peer[1])))
        if self.buf:
            self.bytes_from_client += len(self.buf)
            upstream.write(bytes(self.buf))
        self.buf = bytearray()
        self._start_relay(RawSide(self, upstream, upstream=False))

    # -- relay ----------------------------------------------------------------------------

    def _attach_upstream(self, upstream: asyncio.Transport) -> None:
        self.upstream = upstream
        self._open_transports += 1

    def _start_relay(self, client_side: Side) -> None:
        transport = self.transport
        assert transport is not None
        client_side.connection_made(transport)
        transport.set_protocol(client_side)
        self.state = RELAY
        self.touched = False
        self.last_active = self.worker.loop.time()
        transport.resume_reading()

    def side_lost(self, side: Side, exc: BaseException | None) -> None:
        """A relay side's transport is gone: end the session."""
        if _relay_log.isEnabledFor(logging.DEBUG):
            direction = self._direction(side)
            text = "EOF" if exc is None else str(exc)
            logger = _front_log if self.fronted else _relay_log
            logger.debug(f"{direction} has been finished because of {text}", extra=self._fields())
        self._transport_lost()

    def side_failed(self, side: Side, reason: str) -> None:
        """A relay side got bytes it cannot process: end the session."""
        if _relay_log.isEnabledFor(logging.DEBUG):
            _relay_log.debug(
                f"{self._direction(side)} has been finished: {reason}", extra=self._fields()
            )
        self.close()

    def _direction(self, side: Side) -> str:
        if side.upstream:
            return "telegram -> client"
        return "client -> telegram"

    # -- timers (driven by the worker's sweeper) ------------------------------------------

    def _handshake_timeout(self) -> None:
        self._timer = None
        if self.state in (PROXY_HEADER, HELLO, OBFS2):
            if _log.isEnabledFor(logging.INFO):
                _log.info(
                    "handshake timeout",
                    extra=self._fields(error="client did not finish the handshake in time"),
                )
            self.close()

    def tick(self, now: float, idle_timeout: float, linger: float, flush: bool) -> None:
        """Called periodically by the worker: idle timeout, stuck closes, traffic flush."""
        state = self.state
        if state == RELAY:
            if self.touched:
                self.touched = False
                self.last_active = now
            elif now - self.last_active >= idle_timeout:
                if _log.isEnabledFor(logging.DEBUG):
                    _log.debug("idle timeout", extra=self._fields())
                self._abort()
                return
            if flush:
                self.flush_traffic()
        elif state == CLOSING and now - self.closing_since >= linger:
            self._abort()

    def flush_traffic(self) -> None:
        """Send the traffic counted since the last flush as events."""
        send = self.worker.events.send
        if self.bytes_from_client:
            send(events.EventTraffic(self.stream_id, self.bytes_from_client, False))
            self.bytes_from_client = 0
        if self.bytes_to_client:
            send(events.EventTraffic(self.stream_id, self.bytes_to_client, True))
            self.bytes_to_client = 0

    # -- ending ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close both transports after flushing what they still buffer."""
        if self.state >= CLOSING:
            return
        self.state = CLOSING
        self.closing_since = self.worker.loop.time()
        self._cancel_timer()
        for transport in (self.transport, self.upstream):
            if transport is not None and not transport.is_closing():
                transport.close()

    def _abort(self) -> None:
        self.state = CLOSING
        for transport in (self.transport, self.upstream):
            if transport is not None:
                transport.abort()

    def _transport_lost(self) -> None:
        self._open_transports -= 1
        if self.state < CLOSING:
            self.close()
        if self._open_transports <= 0:
            self._finish()

    def _finish(self) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self._cancel_timer()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        worker = self.worker
        if self.front_key is not None:
            worker.fronting_closed(self.front_key)
        worker.sessions.discard(self)
        if not self.started:
            return
        worker.limiter.release()
        self.flush_traffic()
        worker.events.send(events.EventFinish(self.stream_id))
        if _log.isEnabledFor(logging.INFO):
            _log.info("Stream has been finished", extra=self._fields())

    def shutdown(self) -> None:
        """Worker shutdown: cut the session now."""
        self._abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def client_ip(self) -> str:
        """The client's address (from the PROXY header when there is one)."""
        return self.client_addr[0]

    def _fields(self, **extra: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {"client-ip": self.client_addr[0], "stream-id": self.stream_id}
        if self.dc:
            fields["dc"] = self.dc
        fields.update(extra)
        return fields


def _normalise_ip(ip: str) -> str:
    """IPv4-mapped IPv6 (dual-stack listeners) -> plain IPv4, as Go does."""
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip
