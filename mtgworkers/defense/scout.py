"""The doppelganger's scouting raids: fetch real pages and time their TLS records.

:func:`fetch_records` downloads one ``https://`` URL with a TLS client that sees the raw
records (``ssl.SSLObject`` over memory buffers, the socket read by us), so every record's
type, length and arrival time is known, and where the server's handshake ended (the
first record after our first write). :class:`Raider` runs the raids of one proxy: every
``raid-each``, each of ``urls`` ``repeats-per-raid`` times, as mtg's ``doppel`` does, and
adds what it measured to the :class:`~mtgworkers.defense.doppel.SharedState` that every
worker paces with. Only one process raids at a time, and never more often than
``raid-each``: the raid's start time is claimed in the shared state under a lock, so
reloads and restarted workers do not raid again before it is due.

A site that is down, slow or not TLS costs nothing on the client path: raids run in a
background task, each fetch is bounded by a timeout, and a failure is logged ("cannot
learn", warn, as mtg) and retried at the next raid.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from mtgworkers.defense.doppel import Record, SharedState, handshake_size, record_gaps
from mtgworkers.net.http import ResponseError, read_response

if TYPE_CHECKING:
    from mtgworkers.config import Doppelganger

__all__ = ["Fetch", "Raider", "ScoutError", "fetch_records", "raid_fetcher"]

_log = logging.getLogger("mtgworkers.doppelganger")

MAX_BODY = 8 << 20  # the largest page a raid reads
DEFAULT_TIMEOUT = 30.0  # one fetch, when network.timeout.http is unset
READ_SIZE = 65536

OpenSocket = Callable[[str, int], Awaitable[socket.socket]]


class ScoutError(OSError):
    """A page could not be fetched; the message says why."""


@dataclass(frozen=True, slots=True)
class Fetch:
    """One page: the records received, and the index of the first one after our request."""

    records: list[Record]
    first_write: int | None


async def fetch_records(
    url: str,
    open_socket: OpenSocket,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Fetch:
    """GET ``url`` (https only) and return its records with their arrival times.

    ``open_socket(host, port)`` gives a connected non-blocking socket (the dialer).
    The certificate is verified with ``ssl_context`` (default: the system's trust store).
    Raises :class:`ScoutError` for anything that goes wrong, within ``timeout`` seconds.
    """
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ScoutError(f"url {url} must be https")
    host = parts.hostname
    port = parts.port or 443
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        return await asyncio.wait_for(
            _fetch(host, port, target, open_socket, ssl_context, clock), timeout
        )
    except asyncio.TimeoutError:
        raise ScoutError(f"{url}: no answer within {timeout:g}s") from None
    except ssl.SSLError as exc:
        raise ScoutError(f"{url}: TLS failed: {exc.reason or exc}") from None
    except OSError as exc:
        if isinstance(exc, ScoutError):
            raise
        raise ScoutError(f"{url}: {exc.strerror or exc}") from None


async def _fetch(
    host: str,
    port: int,
    target: str,
    open_socket: OpenSocket,
    ssl_context: ssl.SSLContext | None,
    clock: Callable[[], float],
) -> Fetch:
    loop = asyncio.get_running_loop()
    context = ssl_context or ssl.create_default_context()
    sock = await open_socket(host, port)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=host)
    records: list[Record] = []
    framer = _RecordFramer(records, clock)
    plain = asyncio.StreamReader(limit=READ_SIZE)  # the decrypted answer, for read_response

    async def flush() -> None:
        data = outgoing.read()
        if data:
            await loop.sock_sendall(sock, data)

    async def receive() -> bool:
        data = await loop.sock_recv(sock, READ_SIZE)
        if not data:
            incoming.write_eof()
            return False
        framer.feed(data)
        incoming.write(data)
        return True

    async def pump() -> None:
        """Decrypt what arrives into ``plain`` until the server closes."""
        try:
            while True:
                try:
                    chunk = tls.read(READ_SIZE)
                except ssl.SSLWantReadError:
                    await flush()
                    if not await receive():
                        break
                    continue
                except ssl.SSLZeroReturnError:
                    break
                if not chunk:
                    break
                plain.feed_data(chunk)
        except (OSError, ssl.SSLError) as exc:
            plain.set_exception(exc)
            return
        plain.feed_eof()

    reading: asyncio.Task[None] | None = None
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await flush()
                if not await receive():
                    raise ScoutError(
                        f"{host}: connection closed during the TLS handshake"
                    ) from None
        first_write = len(records)  # our Finished and request go out now
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Mozilla/5.0\r\n"
            "Accept: */*\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n"
        )
        tls.write(request.encode())
        await flush()
        reading = asyncio.ensure_future(pump())
        try:
            await read_response(plain, max_body=MAX_BODY)
        except ResponseError as exc:
            raise ScoutError(f"{host}: {exc}") from None
    finally:
        if reading is not None:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading
        sock.close()
    return Fetch(records, first_write)


class _RecordFramer:
    """Cuts the raw TLS stream into records and notes when each one was complete."""

    __slots__ = ("_buf", "_clock", "_records")

    def __init__(self, records: list[Record], clock: Callable[[], float]) -> None:
        self._records = records
        self._clock = clock
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        now = self._clock()
        pos = 0
        while len(buf) - pos >= 5:
            length = (buf[pos + 3] << 8) | buf[pos + 4]
            if len(buf) - pos < 5 + length:
                break
            self._records.append(Record(buf[pos], length, now))
            pos += 5 + length
        del buf[:pos]


class Raider:
    """Runs the scouting raids of one proxy into ``state``; see the module docstring.

    ``lock_fd`` (a descriptor of the shared state's file, or None in one process) guards
    the claim of a raid. ``fetch`` fetches one URL (tests inject their TLS context).
    """

    def __init__(
        self,
        settings: Doppelganger,
        state: SharedState,
        fetch: Callable[[str], Awaitable[Fetch]],
        *,
        lock_fd: int | None = None,
        clock: Callable[[], float] = time.time,
        learn_shape: Callable[[], Awaitable[bytes | None]] | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.fetch = fetch
        self.lock_fd = lock_fd
        self.clock = clock
        # learns the fronting site's ServerHello shape (mtgworkers.defense.shape), once a raid
        self.learn_shape = learn_shape

    async def run(self) -> None:
        """Raid whenever one is due, forever (a background task; cancel to stop)."""
        while True:
            wait = self.claim()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            await self.raid()

    def claim(self) -> float:
        """Claim the raid if it is due: 0 when claimed (the start time is recorded), else
        the seconds until it is due."""
        if self.lock_fd is not None:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        try:
            now = self.clock()
            last = self.state.snapshot().raid_at
            due = last + self.settings.raid_each if last else now
            if due > now:
                return due - now
            self.state.raid_started(now)
            return 0.0
        finally:
            if self.lock_fd is not None:
                fcntl.flock(self.lock_fd, fcntl.LOCK_UN)

    async def raid(self) -> None:
        """One raid: every URL ``repeats-per-raid`` times, then update the state."""
        gaps: list[float] = []
        sizes: list[int] = []
        for _ in range(self.settings.repeats_per_raid):
            size = 0
            for url in self.settings.urls:
                try:
                    fetched = await self.fetch(url)
                except ScoutError as exc:
                    _log.warning("cannot learn", extra={"error": str(exc)})
                    break
                gaps += record_gaps(fetched.records)
                if not size:
                    size = handshake_size(fetched.records, fetched.first_write)
            if size:
                sizes.append(size)
        if self.learn_shape is not None:
            shape = await self.learn_shape()  # None: logged "cannot learn", keep the old one
            if shape is not None:
                self.state.set_shape(shape, self.clock())
        before = self.state.snapshot()
        learned = self.state.add(gaps, sizes, self.clock())
        if learned.noise is not None and learned.calibrated_at != before.calibrated_at:
            noise = learned.noise
            _log.info(
                f"updated noise params: mean={noise.mean} jitter={noise.jitter} "
                f"samples={learned.sizes}"
            )
        if learned.fitted_at != before.fitted_at:
            _log.info(
                f"updated timing params: k={learned.weibull.k:.4f} "
                f"lambda={learned.weibull.lambda_ms:.4f}ms samples={learned.gaps}"
            )


def raid_fetcher(
    open_socket: Callable[..., Awaitable[socket.socket]],
    timeout: float | None,
    ssl_context: ssl.SSLContext | None = None,
) -> Callable[[str], Awaitable[Fetch]]:
    """``fetch(url)`` over the dialer's ``open_socket``, directly (mtg's scout does not go
    through the SOCKS5 proxies), bounded by ``timeout`` (network.timeout.http)."""

    async def dial(host: str, port: int) -> socket.socket:
        return await open_socket(host, port, use_proxies=False)

    async def fetch(url: str) -> Fetch:
        return await fetch_records(
            url, dial, timeout=timeout or DEFAULT_TIMEOUT, ssl_context=ssl_context
        )

    return fetch
