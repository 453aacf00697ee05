"""Relay soak: many short sessions through one proxy process, every way a session can end.

    python -m tests.soak.relay_soak --connections 300000 --concurrency 200 --processes 2

Each session does a full FakeTLS + obfuscated2 handshake, one echoed round trip through a
local fake DC, and then ends one of five ways, in rotation:

  0 client closes (FIN both ways)            1 client half-closes (shutdown SHUT_WR)
  2 client resets (SO_LINGER 0)              3 DC closes after the echo
  4 DC resets after the echo

The proxy must survive all of them (uvloop has been seen to abort with "double free or
corruption" after 10^4-10^5 relayed connections when a half-close was forwarded with
write_eof()), answer every session, and end with the fd count it started with.
Prints one JSON line with the figures; exits non-zero on any failure.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import shutil
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.client import build_client_hello
from tests.support.proxy import ProxyProcess, free_port, make_config
from tests.support.wire import obfs2_client_frame, obfs2_dc_accept, wrap_records

ENDINGS = 5
PAYLOAD = b"soak" * 32  # 128 bytes


# -- fake DC (echo; ends sessions itself in modes 3 and 4) --------------------------------


class _DCProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.side: Any = None
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.side is None:
            self.buf += data
            if len(self.buf) < 64:
                return
            self.side = obfs2_dc_accept(bytes(self.buf[:64]))
            data = bytes(self.buf[64:])
            self.buf.clear()
            if not data:
                return
        plain = self.side.decryptor.update(data)
        # first byte of the payload tells the DC how the session should end
        self.transport.write(self.side.encryptor.update(plain))
        mode = plain[0] - 0x30 if plain else 0
        if mode == 3:
            self.transport.close()
        elif mode == 4:
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

    def eof_received(self) -> bool:
        return False


def _run_dc(port: int, ready: Any) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_DCProtocol, "127.0.0.1", port, backlog=4096)
        ready.set()
        async with server:
            await server.serve_forever()

    uvloop.run(main())


# -- clients ------------------------------------------------------------------------------


@dataclass
class _Result:
    ok: int = 0
    failed: int = 0
    first_error: str = ""


async def _read_records(reader: asyncio.StreamReader, count: int) -> None:
    for _ in range(count):
        header = await reader.readexactly(5)
        await reader.readexactly(int.from_bytes(header[3:5], "big"))


async def _one(port: int, key: bytes, host: str, mode: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(build_client_hello(key, host))
        await _read_records(reader, 3)  # ServerHello, CCS, fake application data
        obfs = obfs2_client_frame(key, 2)
        payload = bytes([0x30 + mode]) + PAYLOAD[1:]
        writer.write(
            b"\x14\x03\x03\x00\x01\x01" + wrap_records(obfs.wire + obfs.encryptor.update(payload))
        )
        got = bytearray()
        while len(got) < len(payload):
            header = await reader.readexactly(5)
            body = await reader.readexactly(int.from_bytes(header[3:5], "big"))
            if header[0] == 0x17:
                got += obfs.decryptor.update(body)
        if bytes(got) != payload:
            raise AssertionError("echo mismatch")
        sock = writer.get_extra_info("socket")
        if mode == 1:
            sock.shutdown(socket.SHUT_WR)
            await asyncio.wait_for(reader.read(), 10)  # the proxy must close
        elif mode == 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        elif mode in (3, 4):
            try:
                await asyncio.wait_for(reader.read(), 10)  # EOF or reset from the proxy
            except ConnectionResetError:
                pass
    finally:
        writer.close()


def _run_clients(
    port: int, key: bytes, host: str, start: int, count: int, concurrency: int, out: Any
) -> None:
    async def main() -> None:
        result = _Result()
        sem = asyncio.Semaphore(concurrency)

        async def guarded(index: int) -> None:
            async with sem:
                try:
                    await asyncio.wait_for(_one(port, key, host, index % ENDINGS), 20)
                    result.ok += 1
                except Exception as exc:
                    result.failed += 1
                    if not result.first_error:
                        result.first_error = f"session {index} mode {index % ENDINGS}: {exc!r}"

        pending: set[asyncio.Task[None]] = set()
        for index in range(start, start + count):
            if len(pending) >= concurrency * 2:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            pending.add(asyncio.ensure_future(guarded(index)))
        if pending:
            await asyncio.wait(pending)
        out.put((result.ok, result.failed, result.first_error))

    # The clients use the default asyncio loop on purpose: the tool must not share the
    # uvloop fault it is looking for in the proxy.
    asyncio.run(main())


def soak(connections: int, concurrency: int, processes: int) -> dict[str, Any]:
    """Run the soak and return its figures (see the module docstring)."""
    ctx = multiprocessing.get_context("spawn")
    dc_port = free_port()
    ready = ctx.Event()
    dc = ctx.Process(target=_run_dc, args=(dc_port, ready), daemon=True)
    dc.start()
    try:
        if not ready.wait(20):
            raise RuntimeError("fake DC did not start")
        key = os.urandom(16)
        host = "soak.test"
        secret = ("ee" + key.hex() + host.encode().hex()).lower()
        bind_port = free_port()
        config = make_config(
            secret,
            bind_port=bind_port,
            dc_port=dc_port,
            fronting_port=free_port(),
            overrides={"debug": False, "concurrency": 65535},
        )
        workdir = Path(tempfile.mkdtemp(prefix="mtgw-soak-"))
        proxy = ProxyProcess(config, workdir).start()
        try:
            # Warm up first: the event loop opens a few descriptors lazily (resolver
            # threads, signal pipe) that are not per-session.
            warm = ctx.Queue()
            _run_clients(bind_port, key, host, 0, 50, 10, warm)
            if warm.get(timeout=60)[1]:
                raise RuntimeError("warm-up sessions failed")
            fds_before = proxy.fd_count()
            started = time.monotonic()
            queue = ctx.Queue()
            share = connections // processes
            workers = []
            for i in range(processes):
                count = share if i < processes - 1 else connections - share * (processes - 1)
                p = ctx.Process(
                    target=_run_clients,
                    args=(bind_port, key, host, i * share, count, concurrency, queue),
                )
                p.start()
                workers.append(p)
            ok = failed = 0
            first_error = ""
            for _ in workers:
                o, f, e = queue.get(timeout=3600)
                ok += o
                failed += f
                first_error = first_error or e
            for p in workers:
                p.join(30)
            elapsed = time.monotonic() - started
            alive = proxy.proc is not None and proxy.proc.poll() is None
            # sessions end asynchronously: give the last ones a moment to be reaped
            deadline = time.monotonic() + 10
            fds_after = proxy.fd_count()
            while fds_after > fds_before and time.monotonic() < deadline:
                time.sleep(0.1)
                fds_after = proxy.fd_count()
            rss_mb = proxy.rss() / 1e6
            crash = "double free" in proxy.output() or "corruption" in proxy.output()
            errors = [r for r in list(proxy.logs) if r.get("level") == "error"]
            exit_code = proxy.stop(check=False)
        finally:
            proxy.kill()
            shutil.rmtree(workdir, ignore_errors=True)
        return {
            "scenario": "relay_soak",
            "connections": connections,
            "ok": ok,
            "failed": failed,
            "first_error": first_error,
            "seconds": round(elapsed, 1),
            "sessions_per_s": round(connections / elapsed, 1),
            "proxy_alive": alive,
            "fds_before": fds_before,
            "fds_after": fds_after,
            "rss_mb_after": round(rss_mb, 1),
            "crash_output": crash,
            "error_lines": len(errors),
            "first_error_line": errors[0] if errors else None,
            "exit_code": exit_code,
        }
    finally:
        dc.kill()
        dc.join(5)


def main(argv: list[str]) -> int:
    import getopt

    opts, _ = getopt.getopt(argv, "", ["connections=", "concurrency=", "processes="])
    settings = {k.lstrip("-"): int(v) for k, v in opts}
    result = soak(
        settings.get("connections", 20000),
        settings.get("concurrency", 100),
        settings.get("processes", 2),
    )
    print(json.dumps(result))
    good = (
        result["failed"] == 0
        and result["proxy_alive"]
        and result["fds_after"] <= result["fds_before"]
        and result["exit_code"] == 0
        and not result["crash_output"]
        and not result["error_lines"]
    )
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
