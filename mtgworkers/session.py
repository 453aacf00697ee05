"""The session orchestrator: everything that happens to one accepted client connection.

This is the only place where a client session is put together; the layers it composes
(the handshake machine, dialer, relay) know nothing about each other. The order of
operations and the failure routing follow mtg (see docs/protocol.md §0):

    accept -> [PROXY header] -> allowlist/blocklist -> concurrency gate (evicts the oldest
      connection without a valid ClientHello when full) -> ClientHello
      -> anti-replay -> ServerHello -> obfuscated2 frame -> dial DC -> relay
    any ClientHello failure or a replayed hello -> domain fronting (replay the bytes read)

Every decision about the client's bytes up to the obfuscated2 frame is taken by
:class:`mtgworkers.protocol.handshake.ServerHandshake`, which does no I/O; this module is
the glue that carries them out: writes, admission, timers, dials, logs and events.

``ClientSession`` is the client transport's protocol during the handshake. Once the
upstream is connected the client transport is handed to a relay side protocol
(``relay.ClientSide`` or ``relay.RawSide``) with ``transport.set_protocol``; the session
object stays as the shared state of the pair (activity flag, traffic counters, closing).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import TYPE_CHECKING, Any

from mtgworkers import events
from mtgworkers.netaddr import join_host_port
from mtgworkers.protocol import obfs2, proxyproto
from mtgworkers.protocol.handshake import (
    NEED_DATA,
    ClientKnown,
    Close,
    CloseReason,
    Dial,
    Front,
    FrontReason,
    Reply,
    ServerHandshake,
)
from mtgworkers.relay import (
    ClientSide,
    DRSTelegramSide,
    PacedTelegramSide,
    RawSide,
    Side,
    TelegramSide,
)

if TYPE_CHECKING:
    from mtgworkers.server import FrontingKey, Worker

# session states
HANDSHAKE = 0  # the handshake machine reads the client's bytes
DIALING = 1  # connecting to a DC or to the fronting host; client reading paused
RELAY = 2  # both transports up, bytes flowing
CLOSING = 3  # transports closing (flushing), waiting for connection_lost
CLOSED = 4

# Bytes buffered from a client while its fronting connection is being dialled.
_MAX_FRONT_BUFFER = 1 << 20

_log = logging.getLogger("mtgworkers.proxy")
_relay_log = logging.getLogger("mtgworkers.proxy.relay")
_front_log = logging.getLogger("mtgworkers.proxy.domain-fronting")


class ClientSession(asyncio.Protocol):
    """Protocol of an accepted client connection; orchestrates its whole life."""

    __slots__ = (
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
        "machine",
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
        self.state = HANDSHAKE
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.upstream_ip = ""
        self.machine: ServerHandshake | None = None
        self.buf = bytearray()  # client bytes for the fronting host, while it is dialled
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
        self.machine = ServerHandshake(
            worker.secret,
            self.client_addr,
            tolerance=worker.tolerate_time_skewness,
            replayed=worker.replay_filter.test_and_add,
            random_bytes=worker.random_bytes,
            proxy_header=worker.proxy_protocol_listener,
            header_allowed=worker.proxy_header_allowed(self.client_addr[0]),
            noise_length=worker.noise_length,
            shape=worker.shape,
        )
        self._timer = worker.loop.call_later(worker.handshake_timeout, self._handshake_timeout)
        self._drive()

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == HANDSHAKE:
            self.machine.receive(data)  # type: ignore[union-attr]
            self._drive()
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

    # -- the handshake: carry out what the machine decides ---------------------------------

    def _drive(self) -> None:
        machine = self.machine
        assert machine is not None
        clock = self.worker.clock
        while self.state == HANDSHAKE:
            action = machine.next_action(clock())
            if action is NEED_DATA:
                return
            kind = type(action)
            if kind is Reply:
                self.worker.admission.proven(self)  # a valid hello: never evicted
                if action.without_sni:  # type: ignore[union-attr]
                    self.worker.events.send(events.EventHelloWithoutSNI(self.stream_id))
                    if _log.isEnabledFor(logging.DEBUG):
                        _log.debug("client hello without SNI", extra=self._fields())
                try:
                    self.transport.write(action.data)  # type: ignore[union-attr]
                except Exception as exc:  # a transport in error state
                    _log.info("cannot send welcome packet", extra={"error": str(exc)})
                    self.close()
            elif kind is ClientKnown:
                address = action.address  # type: ignore[union-attr]
                self.client_addr = (_normalise_ip(address[0]), address[1])
                self._admit()
            elif kind is Front:
                self._front(action)  # type: ignore[arg-type]
            elif kind is Dial:
                self._dial(action)  # type: ignore[arg-type]
            else:
                self._refused(action)  # type: ignore[arg-type]

    def _admit(self) -> None:
        worker = self.worker
        ip = self.client_addr[0]
        reason = worker.check_ip(ip)
        if reason is not None:
            self.close()
            return
        if not worker.admission.acquire(self):
            if _log.isEnabledFor(logging.INFO):
                _log.info("connection was concurrency limited", extra={"ip": ip})
            self.close()
            return
        self.started = True
        self.stream_id = base64.urlsafe_b64encode(worker.random_bytes(16)).rstrip(b"=").decode()
        worker.events.send(events.EventStart(self.stream_id, ip))
        if _log.isEnabledFor(logging.INFO):
            _log.info("Stream has been started", extra=self._fields())

    def _refused(self, action: Close) -> None:
        self.machine = None  # done: its buffers go with it
        reason = action.reason
        if reason is CloseReason.OBFS2_FAILED:
            if _log.isEnabledFor(logging.INFO):
                error = f"cannot process client handshake: {action.error}"
                _log.info(reason.value, extra=self._fields(error=error))
        elif reason is CloseReason.PROXY_NO_CLIENT:
            # A balancer's own connection (HAProxy's health checks send PROXY v2 LOCAL) or
            # one it cannot attribute (v1 UNKNOWN): nobody to serve, nothing to report.
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug(reason.value)
        elif reason is CloseReason.PROXY_UNTRUSTED:
            _log.info(reason.value, extra={"ip": self.client_addr[0], "error": action.error})
        else:
            _log.info(reason.value, extra={"error": action.error})
        self.close()

    def _front(self, action: Front) -> None:
        self.machine = None  # done: its buffers go with it
        self.worker.admission.proven(self)  # talks to the website from now on
        if action.reason is FrontReason.REPLAY:
            _log.warning(action.reason.value)
            self.worker.events.send(events.EventReplayAttack(self.stream_id))
        elif _log.isEnabledFor(logging.INFO):
            _log.info(action.reason.value, extra={"error": action.error})
        self.buf = bytearray(action.data)
        self._start_fronting()

    def _dial(self, action: Dial) -> None:
        self.machine = None  # done: its buffers go with it
        self._cancel_timer()  # mtg clears the handshake deadline before dialling Telegram
        self.state = DIALING
        self.transport.pause_reading()  # type: ignore[union-attr]
        # loop.create_task, not asyncio.ensure_future: no type checks and no
        # get_event_loop() (a getpid() system call) per client.
        self._task = self.worker.loop.create_task(self._connect_telegram(action))

    # -- Telegram -------------------------------------------------------------------------

    async def _connect_telegram(self, action: Dial) -> None:
        # One coroutine for the whole dial (no wrapper coroutine per session): a bug in
        # it must cost this session only, never the worker.
        try:
            await self._telegram(action)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
        finally:
            self._task = None  # a finished task would stay referenced for the whole session

    async def _telegram(self, action: Dial) -> None:
        worker = self.worker
        handshake = action.handshake
        original_dc = dc = action.dc
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

        # The DC leg's frame and sides are made before the dial: the connected transport
        # goes straight to its protocol (Dialer.connect), without a socket hand-over.
        frame, dc_encryptor, dc_decryptor = obfs2.generate_dc_frame(
            dc, handshake.tag, urandom=worker.random_bytes
        )
        client_transport = self.transport
        assert client_transport is not None
        dc_side: TelegramSide
        if worker.pacer is not None:
            dc_side = PacedTelegramSide(
                self,
                client_transport,
                dc_decryptor.update,
                handshake.encryptor.update,
                pacer=worker.pacer,
                drs=worker.drs,
            )
        else:
            side_class = DRSTelegramSide if worker.drs else TelegramSide
            dc_side = side_class(
                self, client_transport, dc_decryptor.update, handshake.encryptor.update
            )

        upstream: asyncio.Transport | None = None
        last_error: BaseException | None = None
        for host, port in addresses:
            try:
                upstream = await worker.dialer.connect(host, port, dc_side.itself)
            except OSError as exc:
                last_error = exc
                continue
            break
        if upstream is None:
            fields = self._fields(dc=dc, error=f"no addresses to call: {last_error}")
            if dc != original_dc:
                fields["original_dc"] = original_dc
            _log.warning("cannot dial to telegram", extra=fields)
            self.close()
            return
        if self.state != DIALING:  # the client went away while we were dialling
            upstream.abort()
            return
        self._attach_upstream(upstream)
        peer = upstream.get_extra_info("peername")
        self.upstream_ip = _normalise_ip(peer[0]) if peer else host
        client_side = ClientSide(
            self, upstream, action.reader, handshake.decryptor.update, dc_encryptor.update
        )
        upstream.write(frame)
        pending = action.pending
        if pending:
            # Bytes the client sent right behind its frame: still encrypted for the client
            # stream, so they take the normal relay path.
            out = dc_encryptor.update(handshake.decryptor.update(pending))
            self.bytes_from_client += len(out)
            upstream.write(out)
        worker.events.send(events.EventConnectedToDC(self.stream_id, self.upstream_ip, dc))
        self._start_relay(client_side)

    def _failed(self, exc: Exception) -> None:
        _log.error("session failed", extra=self._fields(error=repr(exc)), exc_info=exc)
        self._abort()

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
        self._task = self.worker.loop.create_task(self._connect_front())

    async def _connect_front(self) -> None:
        try:
            await self._front_dial()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
        finally:
            self._task = None

    async def _front_dial(self) -> None:
        worker = self.worker
        host, port = worker.fronting_address
        front_side = RawSide(self, self.transport, upstream=True)
        try:
            upstream = await worker.dialer.connect(host, port, front_side.itself, use_proxies=False)
        except OSError as exc:
            _log.warning("cannot dial to the fronting domain", extra={"error": str(exc)})
            self.close()
            return
        if self.state != DIALING:
            upstream.abort()
            return
        # Counted from here: closing it below ends the session through connection_lost.
        self._attach_upstream(upstream)
        peer = upstream.get_extra_info("peername")
        local = upstream.get_extra_info("sockname")
        if not peer or not local:  # reset before we got here: connection_lost follows
            self.close()
            return
        if worker.is_own_listener(peer):
            _log.error(
                "cannot dial to the fronting domain",
                extra={
                    "error": f"{join_host_port(peer[0], peer[1])} is this proxy itself "
                    "(fronting loop)"
                },
            )
            self.close()
            return
        # Registered before a byte is sent, so our own accept of a looped dial knows it.
        self.front_key = worker.fronting_dialled(local, peer)
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
        if self.state == HANDSHAKE:
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
        worker.finished(self)
        if not self.started:
            return
        worker.admission.release(self)
        self.flush_traffic()
        worker.events.send(events.EventFinish(self.stream_id))
        if _log.isEnabledFor(logging.INFO):
            _log.info("Stream has been finished", extra=self._fields())

    def evict(self) -> bool:
        """The concurrency limit is reached and this admitted session, still without a
        valid ClientHello, is its worker's oldest: close it to make room (a FIN, as a web
        server closes idle connections when it runs out of them). False when the
        handshake is over already (see mtgworkers.admission)."""
        if self.state != HANDSHAKE:
            return False
        if _log.isEnabledFor(logging.INFO):
            _log.info(
                "connection was evicted by the concurrency limit",
                extra={"ip": self.client_addr[0]},
            )
        self.close()
        return True

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
