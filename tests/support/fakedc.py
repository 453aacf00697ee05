"""A fake Telegram DC on 127.0.0.1 (asyncio, in a background thread with its own loop).

The proxy opens a connection and sends a 64-byte obfuscated2 frame without a secret
(docs/protocol.md §4.2). The fake DC decodes it, records tag and DC, then serves the
connection in one of three modes:

- ``"echo"``: decrypt what arrives and send it back re-encrypted;
- ``"sink"``: read, count and verify the bytes against :data:`PATTERN`
  (optionally sleeping ``sink_delay`` seconds after each read: a slow reader);
- ``"source"``: send ``source_size`` bytes of :data:`PATTERN`, then read until EOF (or,
  with ``close_after_source``, close right after the last byte).

Counters are updated on the loop thread and read under a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.ciphers import CipherContext

from tests.support.wire import FRAME_LEN, KNOWN_TAGS, PATTERN, obfs2_dc_accept

MODES = ("echo", "sink", "source")
_SETTINGS = frozenset({"mode", "source_size", "sink_delay", "read_size", "close_after_source"})


@dataclass
class DCConnection:
    """One connection the fake DC accepted."""

    index: int
    peer: tuple[str, int]
    mode: str
    frame: bytes = b""
    tag: bytes = b""
    dc: int | None = None
    bytes_in: int = 0  # decrypted payload bytes received after the frame
    bytes_out: int = 0  # payload bytes sent
    mismatch_at: int | None = None  # sink mode: first offset that differs from the pattern
    error: str | None = None
    closed: threading.Event = field(default_factory=threading.Event)


def closed_port(host: str = "127.0.0.1") -> int:
    """Return a port on host that nothing listens on (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class FakeDC:
    """Fake Telegram data centre; see the module docstring for the modes."""

    def __init__(
        self,
        mode: str = "echo",
        *,
        source_size: int = 0,
        sink_delay: float = 0.0,
        read_size: int = 65536,
        close_after_source: bool = False,
        host: str = "127.0.0.1",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown fake DC mode {mode!r}")
        self.mode = mode
        self.source_size = source_size
        self.sink_delay = sink_delay
        self.read_size = read_size
        self.close_after_source = close_after_source
        self.host = host
        self.port = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._connections: list[DCConnection] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self.frames_seen = 0
        self.bad_frames = 0

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> int:
        """Start listening on host:0 and return the port."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve, self.host, 0)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-dc", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self.port

    def stop(self) -> None:
        """Close the listener and every connection, stop the loop thread."""
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> FakeDC:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextlib.contextmanager
    def configured(self, **settings: Any) -> Iterator[FakeDC]:
        """Temporarily change mode/source_size/sink_delay/... for new connections."""
        unknown = set(settings) - _SETTINGS
        if unknown:
            raise AttributeError(f"unknown fake DC settings: {sorted(unknown)}")
        if settings.get("mode", self.mode) not in MODES:
            raise ValueError(f"unknown fake DC mode {settings['mode']!r}")
        saved = {name: getattr(self, name) for name in settings}
        for name, value in settings.items():
            setattr(self, name, value)
        try:
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    # -- inspection ---------------------------------------------------------------------
    @property
    def connections(self) -> list[DCConnection]:
        """Snapshot of all connections accepted so far."""
        with self._lock:
            return list(self._connections)

    def stats(self) -> dict[str, int]:
        """Counters: connections, frames_seen, bad_frames, bytes_in, bytes_out, open."""
        with self._lock:
            return {
                "connections": len(self._connections),
                "frames_seen": self.frames_seen,
                "bad_frames": self.bad_frames,
                "bytes_in": sum(c.bytes_in for c in self._connections),
                "bytes_out": sum(c.bytes_out for c in self._connections),
                "open": sum(not c.closed.is_set() for c in self._connections),
            }

    def wait_for_connection(self, index: int = 0, timeout: float = 5.0) -> DCConnection:
        """Wait until connection ``index`` exists and its frame was decoded."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if len(self._connections) > index and self._connections[index].dc is not None:
                    return self._connections[index]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"fake DC: no decoded connection #{index} after {timeout} s "
                        f"({len(self._connections)} connections)"
                    )
                self._changed.wait(left)

    # -- serving ------------------------------------------------------------------------
    def _update(self, conn: DCConnection, **values: object) -> None:
        with self._changed:
            for name, value in values.items():
                setattr(conn, name, value)
            self._changed.notify_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        with self._changed:
            conn = DCConnection(
                len(self._connections), writer.get_extra_info("peername")[:2], self.mode
            )
            self._connections.append(conn)
            self._changed.notify_all()
        try:
            frame = await reader.readexactly(FRAME_LEN)
            side = obfs2_dc_accept(frame)
            with self._changed:
                self.frames_seen += 1
                if side.tag not in KNOWN_TAGS:
                    self.bad_frames += 1
                conn.frame, conn.tag, conn.dc = frame, side.tag, side.dc
                self._changed.notify_all()
            if side.tag not in KNOWN_TAGS:
                self._update(conn, error=f"unknown tag {side.tag.hex()}")
                return
            if conn.mode == "echo":
                await self._echo(conn, reader, writer, side.decryptor, side.encryptor)
            elif conn.mode == "sink":
                await self._sink(conn, reader, side.decryptor)
            else:
                await self._source(conn, reader, writer, side.decryptor, side.encryptor)
        except asyncio.IncompleteReadError as exc:
            self._update(conn, error=f"EOF after {len(exc.partial)} bytes of the frame")
        except (ConnectionError, OSError) as exc:
            self._update(conn, error=f"{type(exc).__name__}: {exc}")
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            conn.closed.set()
            with self._changed:
                self._changed.notify_all()

    async def _echo(
        self,
        conn: DCConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        dec: CipherContext,
        enc: CipherContext,
    ) -> None:
        while data := await reader.read(self.read_size):
            plain = dec.update(data)
            # Counted before the write, so a client that got the echo sees final counters.
            self._update(
                conn, bytes_in=conn.bytes_in + len(plain), bytes_out=conn.bytes_out + len(plain)
            )
            writer.write(enc.update(plain))
            await writer.drain()

    async def _sink(
        self, conn: DCConnection, reader: asyncio.StreamReader, dec: CipherContext
    ) -> None:
        while data := await reader.read(self.read_size):
            plain = dec.update(data)
            if conn.mismatch_at is None:
                bad = PATTERN.mismatch(conn.bytes_in, plain)
                if bad is not None:
                    self._update(conn, mismatch_at=bad)
            self._update(conn, bytes_in=conn.bytes_in + len(plain))
            if self.sink_delay:
                await asyncio.sleep(self.sink_delay)

    async def _source(
        self,
        conn: DCConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        dec: CipherContext,
        enc: CipherContext,
    ) -> None:
        chunk = 65536
        offset = 0
        while offset < self.source_size:
            n = min(chunk, self.source_size - offset)
            offset += n
            self._update(conn, bytes_out=offset)
            writer.write(enc.update(PATTERN.chunk(offset - n, n)))
            await writer.drain()
        if self.close_after_source:
            return
        while data := await reader.read(self.read_size):
            self._update(conn, bytes_in=conn.bytes_in + len(dec.update(data)))
