"""The data path: asyncio protocols that move bytes between a client and its upstream.

After the handshakes a session has two transports, the client's and the upstream's (a
Telegram DC or the fronting website). Each gets one *side* protocol below; a side reads
from its own transport, transforms the bytes and writes them to the peer transport.

Per chunk the work is: (TLS unwrap), one AES-CTR decrypt, one AES-CTR encrypt, (TLS
wrap), one ``write``. Nothing else happens per chunk: no logging, no metrics, no timers.
Activity is recorded by setting ``session.touched``; traffic is counted on the session
and flushed to the event stream in batches by the session itself.

Flow control: when a transport's write buffer passes its high-water mark the event loop
calls ``pause_writing`` on that transport's protocol, which pauses *reading* on the peer
transport; ``resume_writing`` resumes it. Memory per session is therefore bounded by the
transports' write-buffer limits plus what one read can add on top, whatever the speed of
either end. Sides are ``BufferedProtocol``s so that a read is at most :data:`READ_CHUNK`
bytes (uvloop's own reads are up to 256 KiB): a reader that stalls costs at most
``WRITE_BUFFER_HIGH + READ_CHUNK`` (and its TLS headers) in its transport's buffer,
``PACED_PENDING_HIGH`` more with pacing. Every side of the process reads into one shared
buffer, :data:`_READ_BUFFER`: the loop fills it and calls ``buffer_updated`` right away,
and the side has transformed (or copied) the bytes before it returns, so nothing points
into the buffer by the next read. One event loop per process, as the worker runs.

Ending: EOF or an error on either side ends the whole session (mtg closes both sockets
when one direction ends). We never forward a half-close with ``write_eof()``: uvloop has
been seen to abort with "double free or corruption" after 10^4-10^5 relayed connections
doing that. ``transport.close()`` flushes what is still buffered and then closes, which
gives the peer every byte we accepted; the session aborts transports that do not drain
within its linger time.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING, Any, Protocol

from mtgworkers.protocol.faketls import (
    MAX_RECORD_PAYLOAD,
    RecordReader,
    TLSError,
    record_header,
    wrap_application_data,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from mtgworkers.pacing import Pacer

# Transport write-buffer limits. User space only holds what the kernel's socket buffer
# (autotuned, megabytes on a fast path) did not take, so a small mark costs no throughput;
# a reader that stalls costs at most HIGH + one READ_CHUNK here (bench: ``stalled``).
WRITE_BUFFER_HIGH = 32 * 1024
WRITE_BUFFER_LOW = 8 * 1024
# The most one read takes from a socket.
READ_CHUNK = 64 * 1024
_READ_BUFFER = memoryview(bytearray(READ_CHUNK))


class SessionHooks(Protocol):
    """What a side needs from its session (implemented by ``session.ClientSession``)."""

    touched: bool
    bytes_from_client: int
    bytes_to_client: int

    def side_lost(self, side: Side, exc: BaseException | None) -> None: ...

    def side_failed(self, side: Side, reason: str) -> None: ...


class Side(asyncio.BufferedProtocol):
    """One end of a relay: reads its own transport, writes to ``peer``.

    ``upstream`` is True for the Telegram/fronting end; it decides which traffic counter
    the bytes go to and which direction label a log line gets. Reads land in the shared
    :data:`_READ_BUFFER`; subclasses handle ``buffer_updated(n)`` (the first ``n`` bytes).
    """

    __slots__ = ("peer", "session", "transport", "upstream")

    def __init__(self, session: SessionHooks, peer: asyncio.Transport | None, upstream: bool):
        self.session = session
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.upstream = upstream

    # connection management -------------------------------------------------------------

    def itself(self) -> Side:
        """The protocol factory of a side made before its connection (``Dialer.connect``):
        a bound method instead of a ``lambda: side`` closure per session."""
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def eof_received(self) -> bool:
        # False: let the transport close itself; the session then closes the peer after
        # flushing it (see the module docstring on half-close).
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.side_lost(self, exc)

    # flow control: our transport is full -> stop reading the peer, and back -------------

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.is_closing():
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.is_closing():
            peer.resume_reading()


class RawSide(Side):
    """A side that copies bytes unchanged: both ends of a domain-fronting relay."""

    __slots__ = ()

    def buffer_updated(self, nbytes: int) -> None:
        session = self.session
        session.touched = True
        if self.upstream:
            session.bytes_to_client += nbytes
        else:
            session.bytes_from_client += nbytes
        try:
            # a copy: a transport may keep what it cannot send at once
            self.peer.write(_READ_BUFFER[:nbytes].tobytes())  # type: ignore[union-attr]
        except RuntimeError:  # the peer's handle closed in this loop iteration
            session.side_failed(self, "peer connection is closed")


class ClientSide(Side):
    """The client end of a Telegram relay: TLS records in, obfuscated2 re-encryption out."""

    __slots__ = ("decrypt", "encrypt", "reader")

    def __init__(
        self,
        session: SessionHooks,
        peer: asyncio.Transport | None,
        reader: RecordReader,
        decrypt: Callable[[Any], bytes],
        encrypt: Callable[[bytes], bytes],
    ) -> None:
        super().__init__(session, peer, upstream=False)
        self.reader = reader
        self.decrypt = decrypt  # client -> proxy obfuscated2 stream
        self.encrypt = encrypt  # proxy -> DC obfuscated2 stream

    def buffer_updated(self, nbytes: int) -> None:
        try:
            payloads = self.reader.feed(_READ_BUFFER[:nbytes])
        except TLSError as exc:
            self.session.side_failed(self, f"cannot read tls record: {exc}")
            return
        if not payloads:
            return
        decrypt = self.decrypt
        encrypt = self.encrypt
        if len(payloads) == 1:
            out = encrypt(decrypt(payloads[0]))
        else:
            out = encrypt(decrypt(b"".join(payloads)))
        session = self.session
        session.touched = True
        session.bytes_from_client += len(out)
        try:
            self.peer.write(out)  # type: ignore[union-attr]
        except RuntimeError:  # the peer's handle closed in this loop iteration
            session.side_failed(self, "peer connection is closed")


class TelegramSide(Side):
    """The DC end of a Telegram relay: obfuscated2 in, TLS application-data records out."""

    __slots__ = ("decrypt", "encrypt")

    def __init__(
        self,
        session: SessionHooks,
        peer: asyncio.Transport | None,
        decrypt: Callable[[Any], bytes],
        encrypt: Callable[[bytes], bytes],
    ) -> None:
        super().__init__(session, peer, upstream=True)
        self.decrypt = decrypt  # DC -> proxy obfuscated2 stream
        self.encrypt = encrypt  # proxy -> client obfuscated2 stream

    def buffer_updated(self, nbytes: int) -> None:
        out = self.encrypt(self.decrypt(_READ_BUFFER[:nbytes]))
        size = len(out)
        session = self.session
        session.touched = True
        session.bytes_to_client += size
        try:
            self.peer.write(wrap_application_data(out))  # type: ignore[union-attr]
        except RuntimeError:  # the peer's handle closed in this loop iteration
            session.side_failed(self, "peer connection is closed")


# mtg's dynamic record sizing (docs/protocol.md §8.3): like a web server's TLS slow start,
# the first records of a burst are small. Sizes are payload bytes per record.
DRS_SMALL_RECORDS = 40  # records 1..40: 1351..1450 bytes
DRS_MEDIUM_RECORDS = 60  # records 41..60: 3997..4096 bytes, then MAX_RECORD_PAYLOAD
DRS_IDLE_RESET = 1.0  # seconds without records that start a new burst


class RecordSizes:
    """The payload limit of each record to the client: mtg's dynamic record sizing when
    ``drs`` is on, else always :data:`MAX_RECORD_PAYLOAD`."""

    __slots__ = ("drs", "last", "records")

    def __init__(self, drs: bool) -> None:
        self.drs = drs
        self.records = 0
        self.last = 0.0

    def burst(self) -> None:
        """Called before the records of one write: a pause over 1 s starts a new burst."""
        now = time.monotonic()
        if now - self.last > DRS_IDLE_RESET:
            self.records = 0
        self.last = now

    def next(self) -> int:
        """The limit for the next record."""
        if not self.drs:
            return MAX_RECORD_PAYLOAD
        records = self.records
        self.records = records + 1
        if records < DRS_SMALL_RECORDS:
            return 1450 - random.randrange(100)
        if records < DRS_MEDIUM_RECORDS:
            return 4096 - random.randrange(100)
        return MAX_RECORD_PAYLOAD


class DRSTelegramSide(TelegramSide):
    """:class:`TelegramSide` with dynamic record sizing (``[defense.doppelganger] drs``).

    A separate class so that the default path pays nothing for it.
    """

    __slots__ = ("sizes",)

    def __init__(
        self,
        session: SessionHooks,
        peer: asyncio.Transport | None,
        decrypt: Callable[[Any], bytes],
        encrypt: Callable[[bytes], bytes],
    ) -> None:
        super().__init__(session, peer, decrypt, encrypt)
        self.sizes = RecordSizes(drs=True)

    def buffer_updated(self, nbytes: int) -> None:
        out = self.encrypt(self.decrypt(_READ_BUFFER[:nbytes]))
        size = len(out)
        session = self.session
        session.touched = True
        session.bytes_to_client += size
        sizes = self.sizes
        sizes.burst()
        view = memoryview(out)
        parts: list[bytes | memoryview] = []
        pos = 0
        while pos < size:
            chunk = view[pos : pos + sizes.next()]
            pos += len(chunk)
            parts.append(record_header(len(chunk)))
            parts.append(chunk)
        try:
            self.peer.write(b"".join(parts))  # type: ignore[union-attr]
        except RuntimeError:  # the peer's handle closed in this loop iteration
            session.side_failed(self, "peer connection is closed")


# What a paced side holds back from the DC before it stops reading it: a few records'
# worth at ~2.4 MB/s, so a stalled or slow client costs little memory. Its reads take at
# most what fits below the mark (and at least PACED_MIN_READ).
PACED_PENDING_HIGH = 32 * 1024
PACED_PENDING_LOW = 8 * 1024
PACED_MIN_READ = 16 * 1024


class PacedTelegramSide(TelegramSide):
    """:class:`TelegramSide` whose records to the client leave one at a time, each after
    a delay from the worker's :class:`~mtgworkers.pacing.Pacer` (``[defense.doppelganger]
    pacing``), as mtg's doppelganger does.

    Decrypted DC bytes wait in ``pending``; a record takes whatever is waiting, up to the
    current size limit (DRS on top when enabled). When the delay passes with nothing to
    send, the next bytes go out at once and start the next delay. Reading from the DC
    pauses above :data:`PACED_PENDING_HIGH` bytes waiting. When the DC closes, what is
    still waiting is written at once, so the client gets every byte.
    """

    __slots__ = ("pacer", "pending", "ready", "sizes", "stopped")

    def __init__(
        self,
        session: SessionHooks,
        peer: asyncio.Transport | None,
        decrypt: Callable[[Any], bytes],
        encrypt: Callable[[bytes], bytes],
        *,
        pacer: Pacer,
        drs: bool,
    ) -> None:
        super().__init__(session, peer, decrypt, encrypt)
        self.pacer = pacer
        self.pending = bytearray()
        self.ready = False  # the delay passed with nothing to send
        self.stopped = False
        self.sizes = RecordSizes(drs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.pacer.after(self, self.pacer.delay())  # mtg: the first record waits too

    def get_buffer(self, sizehint: int) -> memoryview:
        room = PACED_PENDING_HIGH - len(self.pending)
        if room >= READ_CHUNK:
            return _READ_BUFFER
        return _READ_BUFFER[: max(room, PACED_MIN_READ)]

    def buffer_updated(self, nbytes: int) -> None:
        out = self.encrypt(self.decrypt(_READ_BUFFER[:nbytes]))
        session = self.session
        session.touched = True
        session.bytes_to_client += len(out)
        pending = self.pending
        if not pending:
            self.sizes.burst()
        pending += out
        if self.ready:
            self.ready = False
            self._send()
        if len(pending) > PACED_PENDING_HIGH:
            self.transport.pause_reading()  # type: ignore[union-attr]

    def due(self) -> None:
        if self.stopped:
            return
        if self.pending:
            self._send()
        else:
            self.ready = True

    def _send(self) -> None:
        peer = self.peer
        pacer = self.pacer
        if peer is None or peer.is_closing():
            return
        if peer.get_write_buffer_size() < WRITE_BUFFER_HIGH:  # else: a slow client, wait
            pending = self.pending
            limit = self.sizes.next()
            chunk = bytes(pending[:limit])
            del pending[:limit]
            try:
                peer.write(record_header(len(chunk)) + chunk)
            except RuntimeError:  # the peer's handle closed in this loop iteration
                self.session.side_failed(self, "peer connection is closed")
                return
            if len(pending) <= PACED_PENDING_LOW:
                transport = self.transport
                if transport is not None and not transport.is_closing():
                    transport.resume_reading()
        pacer.after(self, pacer.delay())

    def connection_lost(self, exc: Exception | None) -> None:
        self.stopped = True
        pending = self.pending
        peer = self.peer
        if pending and peer is not None and not peer.is_closing():
            try:
                peer.write(wrap_application_data(pending))
            except RuntimeError:
                pass
        self.pending = bytearray()
        super().connection_lost(exc)
