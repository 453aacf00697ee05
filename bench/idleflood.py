"""An idle-connection flood: N connections that send nothing, each opened again as soon as
the proxy closes it (the attack of the ``idle_flood`` scenario; also usable by hand)::

    python -m bench.idleflood --port PORT [--host 127.0.0.1] [--connections 1200]
                              [--seconds S]

Prints one JSON line per second on stdout, ``{"open": N, "opened": TOTAL, "closed":
TOTAL}``: connections open now, and totals since the start. Runs until ``--seconds``
passed (default: forever) or SIGTERM/SIGINT. A failed connect is retried after 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import signal
import sys
from typing import Any


class Flood:
    def __init__(self, host: str, port: int, connections: int) -> None:
        self.host = host
        self.port = port
        self.connections = connections
        self.open = 0
        self.opened = 0
        self.closed = 0
        self.stopping = False

    async def hold(self) -> None:
        """One attacker slot: connect, wait for the proxy to close, connect again."""
        loop = asyncio.get_running_loop()
        while not self.stopping:
            lost: asyncio.Future[None] = loop.create_future()
            try:
                transport, _ = await loop.create_connection(
                    functools.partial(_Silent, lost), self.host, self.port
                )
            except OSError:
                await asyncio.sleep(0.01)
                continue
            self.open += 1
            self.opened += 1
            try:
                await lost
            finally:
                transport.abort()
                self.open -= 1
                self.closed += 1

    def report(self) -> None:
        line = {"open": self.open, "opened": self.opened, "closed": self.closed}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()


class _Silent(asyncio.Protocol):
    def __init__(self, lost: asyncio.Future[None]) -> None:
        self.lost = lost

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def run(host: str, port: int, connections: int, seconds: float | None) -> None:
    loop = asyncio.get_running_loop()
    flood = Flood(host, port, connections)
    done: asyncio.Future[Any] = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: done.done() or done.set_result(None))
    if seconds is not None:
        loop.call_later(seconds, lambda: done.done() or done.set_result(None))
    tasks = [asyncio.ensure_future(flood.hold()) for _ in range(connections)]

    async def reporter() -> None:
        while True:
            flood.report()
            await asyncio.sleep(1.0)

    ticker = asyncio.ensure_future(reporter())
    await done
    flood.stopping = True
    for task in [*tasks, ticker]:
        task.cancel()
    await asyncio.gather(*tasks, ticker, return_exceptions=True)
    flood.report()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idleflood", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1200)
    parser.add_argument("--seconds", type=float, default=None)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(run(args.host, args.port, args.connections, args.seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
