"""The no-crypto baseline: a minimal uvloop TCP relay, the ceiling of the proxy's design.

It performs the same exchange as the proxy, minus every cryptographic and parsing step:

1. read one TLS record from the client (the ClientHello; only its length is looked at);
2. answer with a canned ServerHello + CCS + ApplicationData packet of mtg's average size
   (the client's session id is copied in; no HMAC, no key share generation);
3. wait for the client's first 64 ApplicationData bytes (its obfuscated2 frame), pause the
   client, dial a DC (round robin over ``--dc`` addresses);
4. from then on copy bytes both ways unchanged: the client's TLS records and obfuscated2
   stream go to the fake DC's *tls* port, which decodes them (see ``bench/fakedc.py``).

Flow control is the proxy's: a full write buffer pauses reading on the other side.
EOF or an error on either side closes both. Run as
``python bench/baseline_relay.py --listen 127.0.0.1:PORT --dc 127.0.0.1:DCPORT [...]``.

Usage:
  baseline_relay.py --listen=HOST:PORT (--dc=HOST:PORT)...
  baseline_relay.py (-h | --help)

Options:
  --listen=HOST:PORT  address to accept clients on
  --dc=HOST:PORT      a fake DC's tls port (repeat for several; dialled round robin)
  -h --help           show this help
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import signal
import socket
import sys
from typing import Any

from docopt import DocoptExit, docopt

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
NOISE_LEN = 3600  # mtg sends 2500..4699 random bytes; the middle of that
HELLO_LIMIT = 11 * (5 + 0xFFFF)


def canned_welcome() -> bytes:
    """ServerHello (127 bytes with a 32-byte session id) + CCS + one noise record."""
    server_hello = (
        b"\x03\x03"
        + os.urandom(32)
        + b"\x20"
        + bytes(32)  # session id, copied from the client per connection
        + b"\x13\x01\x00\x00\x2e"
        + b"\x00\x2b\x00\x02\x03\x04"
        + b"\x00\x33\x00\x24\x00\x1d\x00\x20"
        + os.urandom(32)
    )
    handshake = b"\x02" + len(server_hello).to_bytes(3, "big") + server_hello
    return (
        b"\x16\x03\x03"
        + len(handshake).to_bytes(2, "big")
        + handshake
        + b"\x14\x03\x03\x00\x01\x01"
        + b"\x17\x03\x03"
        + NOISE_LEN.to_bytes(2, "big")
        + os.urandom(NOISE_LEN)
    )


WELCOME = canned_welcome()
DIALS: set[asyncio.Future[None]] = set()


class Pipe(asyncio.Protocol):
    """One side of the relay once both connections are up: copy to ``peer``."""

    __slots__ = ("owner", "peer", "transport")

    def __init__(self, owner: ClientConn, peer: Any) -> None:
        self.owner = owner
        self.peer = peer
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    def data_received(self, data: bytes) -> None:
        self.peer.write(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.close()

    def pause_writing(self) -> None:
        if not self.peer.is_closing():
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.is_closing():
            self.peer.resume_reading()


class ClientConn(asyncio.Protocol):
    """The accepted client connection during the handshake; owns both transports."""

    __slots__ = ("buf", "dc", "relay", "state", "transport", "upstream")

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.buf = bytearray()
        self.state = 0  # 0 hello, 1 frame, 2 dialling, 3 relaying, 4 closed
        self.transport: Any = None
        self.upstream: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.state == 0:
            if len(buf) < 5:
                return
            end = 5 + ((buf[3] << 8) | buf[4])
            if len(buf) < end:
                if len(buf) > HELLO_LIMIT:
                    self.close()
                return
            session_id = bytes(buf[44:76]) if buf[43] == 32 else bytes(32)
            self.transport.write(WELCOME[:44] + session_id + WELCOME[76:])
            del buf[:end]
            self.state = 1
        if self.state == 1 and self._frame_complete():
            self.state = 2
            self.transport.pause_reading()
            task = asyncio.ensure_future(self._dial())
            DIALS.add(task)  # keep a reference until done (the loop holds only a weak one)
            task.add_done_callback(DIALS.discard)

    def _frame_complete(self) -> bool:
        """True once the buffered records hold 64 ApplicationData payload bytes."""
        buf = self.buf
        pos = got = 0
        while len(buf) >= pos + 5:
            length = (buf[pos + 3] << 8) | buf[pos + 4]
            if buf[pos] == 0x17:
                got += min(length, len(buf) - pos - 5)
                if got >= 64:
                    return True
            pos += 5 + length
        return False

    async def _dial(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = next(self.relay.dcs)
        client = self.transport
        try:
            upstream, _ = await loop.create_connection(lambda: Pipe(self, client), host, port)
        except OSError:
            self.close()
            return
        if self.state != 2:
            upstream.abort()
            return
        self.upstream = upstream
        upstream.write(bytes(self.buf))
        self.buf = bytearray()
        side = Pipe(self, upstream)
        side.connection_made(client)
        client.set_protocol(side)
        self.state = 3
        client.resume_reading()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        if self.state == 4:
            return
        self.state = 4
        for transport in (self.transport, self.upstream):
            if transport is not None and not transport.is_closing():
                transport.close()


class Relay:
    def __init__(self, dcs: list[tuple[str, int]]) -> None:
        self.dcs = itertools.cycle(dcs)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise DocoptExit(f"{text!r} is not HOST:PORT") from None


async def serve(listen: tuple[str, int], dcs: list[tuple[str, int]]) -> None:
    loop = asyncio.get_running_loop()
    relay = Relay(dcs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(listen)
    sock.listen(4096)
    sock.setblocking(False)
    server = await loop.create_server(lambda: ClientConn(relay), sock=sock, backlog=4096)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    opts = docopt(str(__doc__), argv=sys.argv[1:] if argv is None else list(argv))
    listen, dcs = _address(opts["--listen"]), [_address(dc) for dc in opts["--dc"]]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    uvloop.run(serve(listen, dcs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
