"""FakeTLS load generator: one uvloop process of several, driven by the runner.

Each process reads JSON commands on stdin and answers JSON lines on stdout:

``{"cmd": "start", "job": {...}}``  set the job up; answers ``ready`` once its connections
                                     are established (``stream``, ``rtt``, ``idle``) or at
                                     once (``handshake``: the slots start cycling)
``{"cmd": "grow", "n": N}``         ``idle`` jobs: open N more sessions; answers ``grown``
``{"cmd": "go"}`` / ``{"cmd": "stop"}``  open / close the measurement window; ``stop``
                                     answers ``result`` (counters of the window), then closes
                                     every connection and answers ``stopped``
``{"cmd": "exit"}``

A connection does what a Telegram client does: ClientHello (template + fresh session id +
HMAC, ``bench.common.HelloFactory``), checks the welcome packet (session id echo, and the
HMAC unless the target is the no-crypto baseline), sends CCS + its obfuscated2 frame and a
16-byte control header telling the fake DC what to do, then payload in ApplicationData
records. Every byte coming back is decrypted and compared with the pattern.

Job kinds: ``stream`` (echo / sink / source, a window of 16 KiB messages in flight),
``rtt`` (ping-pong of small messages, round trips recorded), ``handshake`` (slots that
connect, handshake, do one round trip, wait for the close, repeat) and ``idle`` (sessions
that do one round trip and then stay open). A ``source`` stream with ``"stall": true``
stops reading once it is established and never reads again (``source_bytes``: what it asks
the fake DC for, 0 = endless).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import resource
import socket
import sys
import time
from typing import Any

from bench.common import (
    ACK,
    CCS_RECORD,
    COUNTERS,
    MODE_ECHO,
    MODE_SINK,
    MODE_SOURCE,
    RecordError,
    RecordStream,
    check_welcome,
    control_header,
    obfs2_client_frame,
    parse_secret,
    pattern_at,
    pattern_ok,
    welcome_length,
    wrap,
)
from bench.common import HelloFactory as _HelloFactory

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
MODES = {"echo": MODE_ECHO, "sink": MODE_SINK, "source": MODE_SOURCE}
MAX_SAMPLES = 10
MAX_LATENCIES = 200_000
IDLE_PAYLOAD = 32

# connection states
WELCOME, RUN, DONE, CLOSED = 0, 1, 2, 3


class Job:
    """Settings and counters shared by all connections of this process."""

    def __init__(self, spec: dict[str, Any], board: mmap.mmap | None = None) -> None:
        self.spec = spec
        self.board = board
        self.kind: str = spec["kind"]
        self.host: str = spec["host"]
        self.port: int = spec["port"]
        key, host = parse_secret(spec["secret"])
        self.key = key
        self.hmac_key = key if spec.get("verify_hmac", True) else None
        # ``probe``: what a censor's active probe sends, a well-formed hello for the right
        # host signed with another key; the proxy fronts it to the website.
        self.hellos = _HelloFactory(os.urandom(16) if self.kind == "probe" else key, host)
        self.mode = MODES[spec.get("mode", "echo")]
        self.msg = int(spec.get("msg", 16384))
        self.window = int(spec.get("window", 65536))
        self.think = float(spec.get("think", 0.0))
        self.hs_bytes = int(spec.get("hs_bytes", 128))
        self.timeout = float(spec.get("timeout", 10.0))
        self.dcs: list[int] = list(spec.get("dcs", [2]))
        self.src_ips: list[str] = list(spec.get("src_ips", []))
        self.open_concurrency = int(spec.get("open_concurrency", 128))
        self.max_record = int(spec.get("max_record", 16379))
        self.refill = self.kind == "stream" and self.mode != MODE_SOURCE
        self.holding = self.kind == "stream" and self.mode == MODE_SOURCE
        # source streams that never read again once established (the stalled scenario)
        self.stall = bool(spec.get("stall", False))
        self.source_bytes = int(spec.get("source_bytes", 0))  # 0: endless
        self.rcvbuf = int(spec.get("rcvbuf", 0))  # SO_RCVBUF of the client sockets (0: auto)
        self._dc_i = 0
        self._src_i = 0
        self.running = True
        self.measuring = False
        self.clients: set[Client] = set()
        # counters (monotonic; the window is the difference between go and stop)
        self.rx = 0
        self.tx = 0
        self.completed = 0
        self.established = 0
        self.failed = 0
        self.corrupt = 0
        self.samples: list[str] = []
        self.latencies: list[int] = []  # ns: round trips (rtt) or connect-to-close (handshake)

    def next_dc(self) -> int:
        self._dc_i += 1
        return self.dcs[self._dc_i % len(self.dcs)]

    def next_src(self) -> str | None:
        if not self.src_ips:
            return None
        self._src_i += 1
        return self.src_ips[self._src_i % len(self.src_ips)]

    def note(self, message: str) -> None:
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(message)

    def publish(self) -> None:
        """Copy the counters to the shared board the runner reads at its window edges (so
        the window does not depend on when this busy loop gets to read a command)."""
        board = self.board
        if board is not None:
            COUNTERS.pack_into(
                board,
                0,
                self.rx,
                self.tx,
                self.completed,
                self.established,
                self.failed,
                self.corrupt,
                len(self.clients),
                0,
            )

    def counters(self) -> dict[str, int]:
        return {
            "rx": self.rx,
            "tx": self.tx,
            "completed": self.completed,
            "established": self.established,
            "failed": self.failed,
            "corrupt": self.corrupt,
        }


class Client(asyncio.Protocol):
    """One FakeTLS client connection; its behaviour follows ``job.kind``/``job.mode``."""

    __slots__ = (
        "ackbuf",
        "acked",
        "dc",
        "dec",
        "done",
        "enc",
        "job",
        "random",
        "records",
        "rx_off",
        "session_id",
        "started",
        "state",
        "timer",
        "transport",
        "tx_off",
        "wbuf",
    )

    def __init__(self, job: Job, done: asyncio.Future[bool] | None) -> None:
        self.job = job
        self.done = done
        self.dc = job.next_dc()
        self.state = WELCOME
        self.transport: Any = None
        self.wbuf = bytearray()
        self.records = RecordStream(job.max_record)
        self.enc: Any = None
        self.dec: Any = None
        self.random = b""
        self.session_id = b""
        self.rx_off = 0
        self.tx_off = 0
        self.acked = 0
        self.ackbuf = b""
        self.started = time.perf_counter_ns()
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio ------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        job = self.job
        if not job.running:
            # connected after the job's teardown closed every client: nothing to do, and
            # teardown must not wait for this one
            self.state = CLOSED
            transport.close()
            return
        job.clients.add(self)
        self.timer = asyncio.get_running_loop().call_later(job.timeout, self._timed_out)
        hello, self.random, self.session_id = job.hellos.make()
        transport.write(hello)

    def data_received(self, data: bytes) -> None:
        if self.state == RUN:
            self._records(data)
        elif self.state == WELCOME:
            if self.job.kind == "probe":
                self._site_answer(data)
            else:
                self._welcome(data)
        elif self.state == DONE and data:
            self._fail("bytes after the expected echo", corrupt=True)
        self.job.publish()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        job = self.job
        job.clients.discard(self)
        state = self.state
        self.state = CLOSED
        self._cancel_timer()
        if state == DONE:
            job.completed += 1
            if job.measuring and len(job.latencies) < MAX_LATENCIES:
                job.latencies.append(time.perf_counter_ns() - self.started)
            self._resolve(True)
        elif state != CLOSED and job.running:
            why = "closed by peer" if exc is None else f"{type(exc).__name__}: {exc}"
            job.failed += 1
            job.note(f"connection lost ({_state_name(state)}, {self.rx_off} bytes in): {why}")
            self._resolve(False)
        else:
            self._resolve(False)
        job.publish()

    def pause_writing(self) -> None:  # never expected: every kind bounds what is in flight
        pass

    def resume_writing(self) -> None:
        pass

    # -- probe --------------------------------------------------------------------------
    def _site_answer(self, data: bytes) -> None:
        """A fronted probe: done once the website's ServerHello record is in; then reset
        (an abort leaves no TIME_WAIT behind on the load side)."""
        buf = self.wbuf
        buf += data
        if len(buf) < 6:
            return
        if buf[0] != 0x16 or buf[1] != 3 or buf[5] != 0x02:
            self._fail(f"fronted probe: no ServerHello, got {bytes(buf[:6]).hex()}", True)
            return
        if len(buf) < 5 + ((buf[3] << 8) | buf[4]):
            return
        self.job.established += 1
        self.state = DONE
        self.transport.abort()

    # -- handshake ----------------------------------------------------------------------
    def _welcome(self, data: bytes) -> None:
        buf = self.wbuf
        buf += data
        try:
            end = welcome_length(buf)
        except RecordError as exc:
            self._fail(f"welcome: {exc}", corrupt=True)
            return
        if end is None:
            return
        job = self.job
        problem = check_welcome(bytes(buf[:end]), self.random, self.session_id, job.hmac_key)
        if problem is not None:
            self._fail(problem, corrupt=True)
            return
        rest = bytes(buf[end:])
        self.wbuf = bytearray()
        obfs = obfs2_client_frame(job.key, self.dc)
        self.enc, self.dec = obfs.encryptor, obfs.decryptor
        kind = job.kind
        if kind == "handshake":
            count, first = job.hs_bytes, pattern_at(0, job.hs_bytes)
        elif kind == "idle":
            count, first = 0, pattern_at(0, IDLE_PAYLOAD)
        elif kind == "rtt":
            count, first = 0, pattern_at(0, job.msg)
        else:
            count, first = 0, b""
        mode = job.mode if kind == "stream" else MODE_ECHO
        if mode == MODE_SINK:
            count = max(job.window // 4, 1)  # ack interval
        elif mode == MODE_SOURCE:
            count = job.source_bytes
        self.tx_off = len(first)
        payload = obfs.wire + self.enc.update(control_header(mode, self.dc, count) + first)
        self.state = RUN
        self.started = time.perf_counter_ns()
        self.transport.write(CCS_RECORD + wrap(payload))
        job.tx += len(first)
        if kind == "stream" and mode != MODE_SOURCE:
            self._fill()
        if rest:
            self._records(rest)

    # -- data ---------------------------------------------------------------------------
    def _records(self, data: bytes) -> None:
        try:
            pieces = self.records.feed(data)
        except RecordError as exc:
            self._fail(str(exc), corrupt=True)
            return
        chunks: list[bytes | memoryview] = list(pieces)
        if len(chunks) > 1:
            chunks = [b"".join(chunks)]  # one decrypt and one compare per chunk
        dec = self.dec
        for piece in chunks:
            if self.state != RUN:
                if self.state == DONE:
                    self._fail("bytes after the expected echo", corrupt=True)
                return
            self._plain(dec.update(piece))
        if self.job.refill:
            self._fill()  # once per chunk: fewer, larger writes keep the load side cheap

    def _plain(self, plain: bytes) -> None:
        job = self.job
        n = len(plain)
        if job.mode == MODE_SINK and job.kind == "stream":
            self._acks(plain)
            return
        off = self.rx_off
        if not pattern_ok(off, plain):
            self._fail(f"echo differs from the pattern in [{off}, {off + n})", corrupt=True)
            return
        first = off == 0
        off += n
        self.rx_off = off
        job.rx += n
        if first:
            self._established()
        kind = job.kind
        if kind == "rtt":
            if off == self.tx_off:
                if job.measuring and len(job.latencies) < MAX_LATENCIES:
                    job.latencies.append(time.perf_counter_ns() - self.started)
                if job.think > 0:
                    asyncio.get_running_loop().call_later(job.think, self._ping)
                else:
                    self._ping()
            elif off > self.tx_off:
                self._fail("more echo than sent", corrupt=True)
        elif kind == "handshake":
            if off == job.hs_bytes:
                self.state = DONE  # the DC closes after the echo; we wait for that close
            elif off > job.hs_bytes:
                self._fail("more echo than sent", corrupt=True)

    def _acks(self, plain: bytes) -> None:
        buf = self.ackbuf + plain
        job = self.job
        while len(buf) >= 8:
            (value,) = ACK.unpack_from(buf)
            buf = buf[8:]
            if value <= self.acked or value > self.tx_off:
                self._fail(f"bad sink ack {value} (acked {self.acked}, sent {self.tx_off})", True)
                return
            job.rx += value - self.acked
            if self.acked == 0:
                self._established()
            self.acked = value
        self.ackbuf = buf

    def _established(self) -> None:
        job = self.job
        job.established += 1
        if job.kind != "handshake":  # a handshake keeps its deadline until the close
            self._cancel_timer()
            self._resolve(True)
        if job.holding:
            # A source stream floods as soon as it is up; hold it until every stream of
            # the job is established, or the floods starve the handshakes still running.
            self.transport.pause_reading()

    def _fill(self) -> None:
        job = self.job
        if not job.running or self.state != RUN:
            return
        done = self.acked if job.mode == MODE_SINK else self.rx_off
        room = job.window - (self.tx_off - done)
        msg = job.msg
        if room < msg:
            return
        parts = []
        off = self.tx_off
        while room >= msg:
            parts.append(wrap(self.enc.update(pattern_at(off, msg))))
            off += msg
            room -= msg
        job.tx += off - self.tx_off
        self.tx_off = off
        self.transport.write(b"".join(parts) if len(parts) > 1 else parts[0])

    def _ping(self) -> None:
        if self.state != RUN or not self.job.running:
            return
        msg = self.job.msg
        self.started = time.perf_counter_ns()
        self.transport.write(wrap(self.enc.update(pattern_at(self.tx_off, msg))))
        self.tx_off += msg
        self.job.tx += msg

    # -- ending -------------------------------------------------------------------------
    def _timed_out(self) -> None:
        self.timer = None
        self._fail(f"no progress in {self.job.timeout:.0f} s ({_state_name(self.state)})")

    def _fail(self, message: str, corrupt: bool = False) -> None:
        if self.state == CLOSED:
            return
        job = self.job
        if corrupt:
            job.corrupt += 1
        else:
            job.failed += 1
        job.note(message)
        self.state = CLOSED
        self._cancel_timer()
        self._resolve(False)
        if self.transport is not None:
            self.transport.abort()

    def _resolve(self, ok: bool) -> None:
        done = self.done
        if done is not None and not done.done():
            done.set_result(ok)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        """Close on our side (end of a job): not an error."""
        self._cancel_timer()
        self.state = CLOSED
        if self.transport is not None:
            self.transport.close()


TEARDOWN_GRACE = 2.0  # seconds a job's clients get to close at the end of a job


def _state_name(state: int) -> str:
    return ("welcome", "running", "done", "closed")[state]


# -- opening connections ------------------------------------------------------------------
async def connect(job: Job, done: asyncio.Future[bool] | None) -> None:
    """Open one client connection (raises OSError when the connect fails)."""
    loop = asyncio.get_running_loop()
    src = job.next_src()
    if job.rcvbuf:
        # a small receive buffer, set before the connect (the window scale depends on it)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, job.rcvbuf)
            sock.setblocking(False)
            await loop.sock_connect(sock, (job.host, job.port))
            await loop.create_connection(lambda: Client(job, done), sock=sock)
        except BaseException:
            sock.close()
            raise
        return
    if src is None:
        await loop.create_connection(lambda: Client(job, done), job.host, job.port)
        return
    # An explicit source address (to go past one address's ephemeral ports): let the
    # kernel pick the port at connect time so ports are shared across destinations.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((src, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (job.host, job.port))
        await loop.create_connection(lambda: Client(job, done), sock=sock)
    except BaseException:
        sock.close()
        raise


async def open_sessions(job: Job, count: int, deadline: float) -> tuple[int, int]:
    """Open ``count`` connections (``open_concurrency`` at a time) and wait until each is
    established or failed. Returns (ok, failed)."""
    loop = asyncio.get_running_loop()
    remaining = count
    ok = failed = 0

    async def opener() -> None:
        nonlocal remaining, ok, failed
        while remaining > 0 and job.running and loop.time() < deadline:
            remaining -= 1
            done: asyncio.Future[bool] = loop.create_future()
            try:
                await connect(job, done)
            except OSError as exc:
                job.failed += 1
                job.note(f"connect: {exc}")
                failed += 1
                continue
            if await done:
                ok += 1
            else:
                failed += 1

    workers = min(job.open_concurrency, max(count, 1))
    await asyncio.gather(*(opener() for _ in range(workers)))
    failed += max(remaining, 0)
    return ok, failed


async def handshake_slot(job: Job) -> None:
    """Connect, handshake, one round trip, wait for the close; repeat while running."""
    loop = asyncio.get_running_loop()
    while job.running:
        done: asyncio.Future[bool] = loop.create_future()
        try:
            await connect(job, done)
        except OSError as exc:
            job.failed += 1
            job.note(f"connect: {exc}")
            await asyncio.sleep(0.05)
            continue
        await done


# -- command loop ----------------------------------------------------------------------------
def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class Worker:
    def __init__(self, board: mmap.mmap | None) -> None:
        self.board = board
        self.job: Job | None = None
        self.tasks: list[asyncio.Future[Any]] = []
        self.window_start = 0.0
        self.start_counters: dict[str, int] = {}

    async def start(self, spec: dict[str, Any]) -> None:
        await self.teardown()
        job = self.job = Job(spec, self.board)
        self.start_counters = {}
        job.publish()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(spec.get("setup_timeout", 60.0))
        if job.kind in ("handshake", "probe"):
            self.tasks = [
                asyncio.ensure_future(handshake_slot(job)) for _ in range(int(spec["slots"]))
            ]
            emit({"event": "ready", "ok": 0, "failed": 0})
            return
        ok, failed = await open_sessions(job, int(spec["streams"]), deadline)
        if job.holding and not job.stall:
            job.holding = False
            for client in job.clients:
                if client.transport is not None and not client.transport.is_closing():
                    client.transport.resume_reading()
        emit({"event": "ready", "ok": ok, "failed": failed, "samples": job.samples})

    async def grow(self, n: int, timeout: float) -> None:
        job = self.job
        if job is None:
            emit({"event": "grown", "ok": 0, "failed": n})
            return
        deadline = asyncio.get_running_loop().time() + timeout
        ok, failed = await open_sessions(job, n, deadline)
        emit(
            {
                "event": "grown",
                "ok": ok,
                "failed": failed,
                "active": len(job.clients),
                "samples": job.samples,
            }
        )

    def go(self) -> None:
        job = self.job
        if job is not None:
            job.measuring = True
            job.latencies = []
            self.start_counters = job.counters()
        self.window_start = time.perf_counter()
        emit({"event": "going"})

    async def stop(self) -> None:
        elapsed = time.perf_counter() - self.window_start
        job = self.job
        result: dict[str, Any] = {"event": "result", "elapsed": elapsed}
        if job is not None:
            job.measuring = False
            now = job.counters()
            result.update({k: v - self.start_counters.get(k, 0) for k, v in now.items()})
            result["total_failed"] = now["failed"]
            result["total_corrupt"] = now["corrupt"]
            result["active"] = len(job.clients)
            result["samples"] = job.samples
            result["latencies_ns"] = job.latencies
        emit(result)
        await self.teardown()
        emit({"event": "stopped"})

    async def teardown(self) -> None:
        job = self.job
        if job is None:
            return
        job.running = False
        for task in self.tasks:
            task.cancel()
        self.tasks = []
        for client in list(job.clients):
            client.close()
        loop = asyncio.get_running_loop()
        # Closing is local and immediate unless a write buffer is still full: two seconds
        # is plenty; whatever is left is aborted (and named, for diagnosis).
        deadline = loop.time() + TEARDOWN_GRACE
        while job.clients and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if job.clients:
            states = sorted(_state_name(client.state) for client in job.clients)
            job.note(f"teardown: {len(states)} clients still open, aborted ({states[:5]})")
        for client in list(job.clients):
            if client.transport is not None:
                client.transport.abort()
        self.job = None


async def command_loop(board: mmap.mmap | None) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker = Worker(board)
    emit({"event": "hello"})
    pending: set[asyncio.Future[Any]] = set()
    while True:
        line = await reader.readline()
        if not line:
            break
        message = json.loads(line)
        command = message.get("cmd")
        if command == "start":
            task = asyncio.ensure_future(worker.start(message["job"]))
        elif command == "grow":
            task = asyncio.ensure_future(
                worker.grow(int(message["n"]), float(message.get("timeout", 60)))
            )
        elif command == "go":
            worker.go()
            continue
        elif command == "stop":
            task = asyncio.ensure_future(worker.stop())
        elif command == "exit":
            break
        else:
            emit({"event": "error", "message": f"unknown command {command!r}"})
            continue
        pending.add(task)
        task.add_done_callback(_report_crash)
        task.add_done_callback(pending.discard)
    await worker.teardown()


def _report_crash(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        emit({"event": "error", "message": repr(task.exception())})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="benchmark load generator (driven by bench.run)")
    parser.add_argument("--counters", help="file the counters are published to (mmap)")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    board = None
    if args.counters:
        with open(args.counters, "r+b") as f:
            board = mmap.mmap(f.fileno(), COUNTERS.size)
    import uvloop

    uvloop.run(command_loop(board))
    return 0


if __name__ == "__main__":
    sys.exit(main())
