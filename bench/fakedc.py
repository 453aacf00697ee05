"""Fake Telegram DC for the benchmark: uvloop, several processes, every byte verified.

Started by the runner as ``python -m bench.fakedc --secret HEX --obfs2-ports P1,P2,..``
``--tls-ports Q1,..``; every process listens on all ports with SO_REUSEPORT, so starting
more processes adds capacity (each process may hold at most ~20k sockets here).

Two kinds of listener:

- *obfs2* ports are what the proxy dials: the proxy's 64-byte obfuscated2 frame (no secret,
  docs/protocol.md §4.2) and then the obfuscated2 stream;
- *tls* ports are behind the no-crypto baseline relay, which forwards the client's bytes
  untouched: TLS records carrying the client's frame (decoded here with the secret, as the
  proxy would) and the client-encrypted stream. Answers are encrypted and wrapped in records
  here. So the load side does the same crypto in both set-ups and the relay does none.

After the frame, the first 16 plaintext bytes are a control header (``bench.common``):
echo, sink (verify, ack the verified total) or source (send pattern bytes). Every received
payload byte is compared with the pattern; any difference aborts the connection and is
counted. Commands on stdin (JSON lines): ``stats``, ``reset``, ``exit``.

Usage:
  fakedc.py --secret=HEX [options]
  fakedc.py (-h | --help)

Options:
  --secret=HEX          the proxy's ee hex secret
  --host=HOST           address to listen on [default: 127.0.0.1]
  --obfs2-ports=PORTS   comma-separated ports the proxy dials (default: none)
  --tls-ports=PORTS     comma-separated ports behind the baseline relay (default: none)
  -h --help             show this help
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import sys
from typing import Any

from docopt import DocoptExit, docopt

from bench.common import (
    ACK,
    CONTROL,
    CONTROL_MAGIC,
    FRAME_LEN,
    MODE_ECHO,
    MODE_SINK,
    MODE_SOURCE,
    TAG_PADDED,
    RecordError,
    RecordStream,
    obfs2_dc_accept,
    parse_secret,
    pattern_at,
    pattern_ok,
    proxy_side_frame,
    wrap,
)

FRAME, HEADER, DATA = 0, 1, 2
SOURCE_CHUNK = 16384
SOURCE_BURST = 64  # chunks written per callback at most (keeps the loop responsive)
DEFAULT_ACK_EVERY = 65536
MAX_SAMPLES = 10


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.accepted = 0
        self.established = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.errors = 0
        self.dc_mismatch = 0
        self.samples: list[str] = []

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(message)


class DCConn(asyncio.Protocol):
    __slots__ = (
        "acked",
        "buf",
        "count",
        "dec",
        "enc",
        "frame_dc",
        "in_off",
        "mode",
        "out_off",
        "paused",
        "records",
        "server",
        "state",
        "tls",
        "transport",
    )

    def __init__(self, server: Server, tls: bool) -> None:
        self.server = server
        self.tls = tls
        self.records = RecordStream() if tls else None
        self.state = FRAME
        self.buf = bytearray()
        self.transport: Any = None
        self.dec: Any = None
        self.enc: Any = None
        self.frame_dc = 0
        self.mode = 0
        self.count = 0
        self.in_off = 0
        self.out_off = 0
        self.acked = 0
        self.paused = False

    # -- asyncio ------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.server.active += 1
        self.server.stats.accepted += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.active -= 1
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True
        if self.mode != MODE_SOURCE and self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is None:
            return
        if self.mode == MODE_SOURCE:
            self._pump()
        else:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if not self.tls:
            self._stream(data)
            return
        try:
            pieces = self.records.feed(data)  # type: ignore[union-attr]
        except RecordError as exc:
            self._fail(f"tls: {exc}")
            return
        if self.state == DATA and len(pieces) > 1:
            pieces = [b"".join(pieces)]  # one decrypt, one verify, one write per chunk
        for piece in pieces:
            if self.transport is None:
                return
            self._stream(piece)

    # -- stream -------------------------------------------------------------------------
    def _stream(self, data: bytes | memoryview) -> None:
        if self.state == DATA:
            self._plain(self.dec.update(data))
            return
        if self.state == FRAME:
            self.buf += data
            if len(self.buf) < FRAME_LEN:
                return
            frame = bytes(self.buf[:FRAME_LEN])
            rest = bytes(self.buf[FRAME_LEN:])
            if self.tls:
                tag, dc, self.dec, self.enc = proxy_side_frame(frame, self.server.key)
            else:
                side = obfs2_dc_accept(frame)
                tag, dc, self.dec, self.enc = side.tag, side.dc, side.decryptor, side.encryptor
            if tag != TAG_PADDED:
                self._fail(f"frame tag {tag.hex()} is not dd dd dd dd")
                return
            self.frame_dc = dc
            self.state = HEADER
            self.buf = bytearray(self.dec.update(rest))
        else:
            self.buf += self.dec.update(data)
        if len(self.buf) < CONTROL.size:
            return
        magic, mode, dc, _flags, count = CONTROL.unpack_from(self.buf)
        if magic != CONTROL_MAGIC or mode not in (MODE_ECHO, MODE_SINK, MODE_SOURCE):
            self._fail(f"bad control header {bytes(self.buf[:16]).hex()}")
            return
        if abs(self.frame_dc) != abs(dc):
            self.server.stats.dc_mismatch += 1
        self.mode, self.count = mode, count
        self.state = DATA
        self.server.stats.established += 1
        rest = bytes(self.buf[CONTROL.size :])
        self.buf = bytearray()
        if mode == MODE_SOURCE:
            self._pump()
        if rest:
            self._plain(rest)

    def _plain(self, data: bytes) -> None:
        n = len(data)
        if not n:
            return
        stats = self.server.stats
        mode = self.mode
        if mode == MODE_SOURCE:  # nothing is expected from the client here
            stats.bytes_in += n
            return
        off = self.in_off
        if not pattern_ok(off, data):
            self._fail(f"payload differs from the pattern in [{off}, {off + n})")
            return
        self.in_off = off + n
        stats.bytes_in += n
        if mode == MODE_ECHO:
            self._send(data)
            if self.count and self.in_off >= self.count:
                if self.in_off > self.count:
                    self._fail(f"client sent {self.in_off} bytes, {self.count} announced")
                    return
                self.transport.close()
        else:  # sink
            every = self.count or DEFAULT_ACK_EVERY
            if self.in_off - self.acked >= every:
                self.acked = self.in_off
                self._send(ACK.pack(self.in_off))

    def _send(self, plain: bytes) -> None:
        out = self.enc.update(plain)
        if self.tls:
            out = wrap(out)
        self.transport.write(out)
        self.server.stats.bytes_out += len(plain)

    def _pump(self) -> None:
        transport = self.transport
        count = self.count
        for _ in range(SOURCE_BURST):
            if transport is None or self.paused or transport.is_closing():
                return
            n = SOURCE_CHUNK if not count else min(SOURCE_CHUNK, count - self.out_off)
            if n <= 0:
                transport.close()
                return
            self._send(pattern_at(self.out_off, n))
            self.out_off += n
        asyncio.get_running_loop().call_soon(self._pump)

    def _fail(self, message: str) -> None:
        self.server.stats.error(message)
        if self.transport is not None:
            self.transport.abort()
            self.transport = None


class Server:
    def __init__(self, key: bytes) -> None:
        self.key = key
        self.stats = Stats()
        self.active = 0

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "accepted": s.accepted,
            "established": s.established,
            "active": self.active,
            "bytes_in": s.bytes_in,
            "bytes_out": s.bytes_out,
            "errors": s.errors,
            "dc_mismatch": s.dc_mismatch,
            "samples": s.samples,
        }


def reuseport_listener(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def serve(host: str, obfs2_ports: list[int], tls_ports: list[int], secret: str) -> None:
    loop = asyncio.get_running_loop()
    key, _host = parse_secret(secret)
    server = Server(key)
    servers = []
    for ports, tls in ((obfs2_ports, False), (tls_ports, True)):
        for port in ports:
            sock = reuseport_listener(host, port)
            servers.append(
                await loop.create_server(
                    lambda tls=tls: DCConn(server, tls),  # type: ignore[misc]
                    sock=sock,
                    backlog=4096,
                )
            )
    emit({"event": "ready"})
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        command = json.loads(line).get("cmd")
        if command == "stats":
            emit({"event": "stats", **server.snapshot()})
        elif command == "reset":
            server.stats.reset()
            emit({"event": "reset"})
        elif command == "exit":
            break
    for srv in servers:
        srv.close()


def _ports(opts: dict[str, Any], name: str) -> list[int]:
    text = opts[name] or ""
    try:
        return [int(p) for p in text.split(",") if p]
    except ValueError:
        raise DocoptExit(f"{name}: {text!r} is not a comma-separated list of ports") from None


def main(argv: list[str] | None = None) -> int:
    opts = docopt(str(__doc__), argv=sys.argv[1:] if argv is None else list(argv))
    obfs2_ports, tls_ports = _ports(opts, "--obfs2-ports"), _ports(opts, "--tls-ports")
    raise_nofile()
    import uvloop

    uvloop.run(serve(opts["--host"], obfs2_ports, tls_ports, opts["--secret"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
