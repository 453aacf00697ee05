"""Soak and memory-peak runs at a box's size (not in CI; run by hand, see README).

    python -m tests.soak.box_soak soak --sessions 30000 --workers 2 --minutes 10
    python -m tests.soak.box_soak peak --sessions 15000 --workers 2 [--no-trim]

``soak``: ``--sessions`` concurrent sessions through one proxy (``--workers`` workers) for
``--minutes``, with churn: every session lives a random 20-90 s (a full FakeTLS +
obfuscated2 handshake, then a random-length payload echoed through a local fake DC every
``--interval`` seconds, each byte compared), closes, and a new one takes its place. The
proxy is reloaded (SIGHUP) every ``--reload-every`` seconds, with a graceful-timeout
longer than any session lives, so no session may be cut. A probe opens one short session
a second and times it (connect to echo). Prints one JSON document: RSS and descriptors of
the proxy's process tree over time, descriptors at the start and after the load closed,
payload mismatches, sessions cut or failed, the probe's latency percentiles, reloads done.
Exits 1 when a payload differed, a session failed or was cut, a reload did not complete,
or the descriptors did not come back.

``peak``: ``--sessions`` idle sessions (one round trip each, then open), then all closed:
the tree's and each worker's RSS at the baseline, at the peak and ``--settle`` seconds
after the close. ``--no-trim`` runs the workers with ``MTGWORKERS_MALLOC_TRIM=0``, for the
figure without returning memory to the system.

Clients bind to 127.0.0.1-127.0.0.8 and the DCs listen on five ports, so neither side
runs out of ephemeral ports; the load runs in ``--load-procs`` processes (uvloop), the
fake DC in ``--dc-procs`` (SO_REUSEPORT). Every process stays below RLIMIT_NOFILE: a worker
needs two descriptors per session, so ``--sessions`` / ``--workers`` must stay below half
of it (``ulimit -n``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from tests.support.client import build_client_hello
from tests.support.proxy import ProxyProcess, free_port, make_config
from tests.support.wire import obfs2_client_frame, obfs2_dc_accept, wrap_records

DCS = (1, 2, 3, 4, 5)
SOURCES = tuple(f"127.0.0.{i}" for i in range(1, 9))
IP_BIND_ADDRESS_NO_PORT = 24
HOST = "soak.test"


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- fake DC: echo --------------------------------------------------------------------------


class _Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.head = bytearray()
        self.side: Any = None
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.side is None:
            self.head += data
            if len(self.head) < 64:
                return
            self.side = obfs2_dc_accept(bytes(self.head[:64]))
            data = bytes(self.head[64:])
            if not data:
                return
        self.transport.write(self.side.encryptor.update(self.side.decryptor.update(data)))


def _run_dc(ports: list[int], ready: Any) -> None:
    import uvloop

    _raise_nofile()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = [
            await loop.create_server(_Echo, "127.0.0.1", port, backlog=4096, reuse_port=True)
            for port in ports
        ]
        ready.set()
        await asyncio.gather(*(server.serve_forever() for server in servers))

    uvloop.run(main())


# -- clients --------------------------------------------------------------------------------


class _Counts:
    def __init__(self) -> None:
        self.opened = self.closed = self.messages = self.bytes = 0
        self.mismatches = self.failed = self.cut = 0
        self.first_error = ""

    def error(self, kind: str, text: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if not self.first_error:
            self.first_error = f"{kind}: {text}"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Session:
    """One client session: handshake, then echo exchanges, each byte compared."""

    def __init__(self, port: int, key: bytes, source: str, dc: int) -> None:
        self.port, self.key, self.source, self.dc = port, key, source, dc
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.obfs: Any = None

    async def open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.source, 0))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        except BaseException:
            sock.close()
            raise
        self.reader, self.writer = await asyncio.open_connection(sock=sock)
        self.writer.write(build_client_hello(self.key, HOST))
        for _ in range(3):  # ServerHello, CCS, the first application data record
            header = await self.reader.readexactly(5)
            await self.reader.readexactly(int.from_bytes(header[3:5], "big"))
        self.obfs = obfs2_client_frame(self.key, self.dc)
        self.writer.write(b"\x14\x03\x03\x00\x01\x01" + wrap_records(self.obfs.wire))

    async def exchange(self, payload: bytes) -> bool:
        """Send ``payload``, read its echo; False when it differs. Raises on EOF."""
        assert self.reader is not None and self.writer is not None
        self.writer.write(wrap_records(self.obfs.encryptor.update(payload)))
        got = bytearray()
        while len(got) < len(payload):
            header = await self.reader.readexactly(5)
            body = await self.reader.readexactly(int.from_bytes(header[3:5], "big"))
            if header[0] == 0x17:
                got += self.obfs.decryptor.update(body)
        return bytes(got) == payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _client_loop(
    index: int,
    port: int,
    key: bytes,
    counts: _Counts,
    stop: asyncio.Event,
    gate: asyncio.Semaphore,
    *,
    churn: bool,
    interval: float,
    idle: asyncio.Event | None,
) -> None:
    rng = random.Random(index)
    source = SOURCES[index % len(SOURCES)]
    dc = DCS[index % len(DCS)]
    while not stop.is_set():
        session = _Session(port, key, source, dc)
        try:
            async with gate:  # bounded handshakes in flight (the hello's 3 s window)
                await asyncio.wait_for(session.open(), 30)
                first = rng.randbytes(rng.randint(16, 2048))
                if not await asyncio.wait_for(session.exchange(first), 30):
                    counts.error("mismatches", f"session {index}: first echo differs")
        except Exception as exc:
            session.close()
            counts.error("failed", f"session {index}: {exc!r}")
            await asyncio.sleep(1.0)
            continue
        counts.opened += 1
        ends = time.monotonic() + rng.uniform(20.0, 90.0)
        try:
            if not churn:
                assert idle is not None
                await idle.wait()
            else:
                while not stop.is_set() and time.monotonic() < ends:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), rng.uniform(0.5, 1.5) * interval)
                    payload = rng.randbytes(rng.randint(16, 4096))
                    if await asyncio.wait_for(session.exchange(payload), 30):
                        counts.messages += 1
                        counts.bytes += len(payload)
                    else:
                        counts.error("mismatches", f"session {index}: echo differs")
        except Exception as exc:
            counts.error("cut", f"session {index}: {exc!r}")
        finally:
            session.close()
            counts.closed += 1
        if not churn:
            return


def _run_load(
    proc: int,
    first: int,
    count: int,
    port: int,
    key: bytes,
    churn: bool,
    interval: float,
    commands: Any,
    results: Any,
) -> None:
    import uvloop

    _raise_nofile()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        counts = _Counts()
        stop, idle = asyncio.Event(), asyncio.Event()
        gate = asyncio.Semaphore(64)
        tasks = [
            asyncio.ensure_future(
                _client_loop(
                    i, port, key, counts, stop, gate, churn=churn, interval=interval, idle=idle
                )
            )
            for i in range(first, first + count)
        ]

        async def report() -> None:
            while True:
                results.put(("progress", proc, counts.as_dict()))
                await asyncio.sleep(5)

        reporter = asyncio.ensure_future(report())
        while True:
            command = await loop.run_in_executor(None, commands.get)
            if command == "close":
                idle.set()
                stop.set()
                break
        await asyncio.wait(tasks, timeout=120)
        reporter.cancel()
        results.put(("done", proc, counts.as_dict()))

    uvloop.run(main())


async def _probe(port: int, key: bytes, stop: asyncio.Event, latencies: list[float]) -> None:
    """One short session a second, timed from connect to its echo."""
    counter = 0
    while not stop.is_set():
        counter += 1
        session = _Session(port, key, "127.0.0.9", DCS[counter % len(DCS)])
        started = time.perf_counter()
        try:
            await asyncio.wait_for(session.open(), 10)
            if await asyncio.wait_for(session.exchange(b"probe" * 20), 10):
                latencies.append(time.perf_counter() - started)
            else:
                latencies.append(float("inf"))
        except Exception:
            latencies.append(float("inf"))
        finally:
            session.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


# -- the proxy's process tree ----------------------------------------------------------------


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _tree_figures(pid: int) -> dict[str, Any]:
    rss = fds = 0
    workers: list[int] = []
    for index, proc in enumerate(_tree(pid)):
        with contextlib.suppress(psutil.Error):
            value = proc.memory_info().rss
            rss += value
            fds += proc.num_fds()
            if index:
                workers.append(value)
    return {
        "rss_mb": round(rss / 2**20, 1),
        "fds": fds,
        "workers_rss_mb": [round(v / 2**20, 1) for v in workers],
    }


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# -- runs -------------------------------------------------------------------------------------


def run(
    mode: str,
    *,
    sessions: int,
    workers: int,
    minutes: float,
    reload_every: float,
    interval: float,
    load_procs: int,
    dc_procs: int,
    settle: float,
    trim: bool,
) -> dict[str, Any]:
    _raise_nofile()
    ctx = multiprocessing.get_context("spawn")
    dc_ports = [free_port() for _ in DCS]
    ready = [ctx.Event() for _ in range(dc_procs)]
    dcs = [ctx.Process(target=_run_dc, args=(dc_ports, r), daemon=True) for r in ready]
    for dc in dcs:
        dc.start()
    workdir = Path(tempfile.mkdtemp(prefix="mtgw-box-soak-"))
    loads: list[Any] = []
    proxy: ProxyProcess | None = None
    try:
        for r in ready:
            if not r.wait(30):
                raise RuntimeError("fake DC did not start")
        key = os.urandom(16)
        secret = "ee" + key.hex() + HOST.encode().hex()
        port = free_port()
        config = make_config(
            secret,
            bind_port=port,
            dc_port=None,
            fronting_port=free_port(),
            overrides={
                "debug": False,
                "concurrency": 2 * sessions + 1000,
                "supervisor": {"workers": workers, "graceful-timeout": "300s"},
                "dc-overrides": {
                    str(dc): [f"127.0.0.1:{p}"] for dc, p in zip(DCS, dc_ports, strict=True)
                },
                "network": {"timeout": {"idle": "10m"}},
            },
        )
        env = {} if trim else {"MTGWORKERS_MALLOC_TRIM": "0"}
        proxy = ProxyProcess(config, workdir).start(env=env)
        proxy.wait_for_log("proxy is listening", timeout=30)
        # warm up: every worker has relayed a few sessions (lazy descriptors, caches)
        warm = asyncio.run(_warm(port, key, 40))
        if warm:
            raise RuntimeError(f"warm-up failed: {warm}")
        time.sleep(1.0)
        baseline = _tree_figures(proxy.pid)
        commands = [ctx.Queue() for _ in range(load_procs)]
        results = ctx.Queue()
        share = sessions // load_procs
        for i in range(load_procs):
            count = share if i < load_procs - 1 else sessions - share * (load_procs - 1)
            p = ctx.Process(
                target=_run_load,
                args=(
                    i,
                    i * share,
                    count,
                    port,
                    key,
                    mode == "soak",
                    interval,
                    commands[i],
                    results,
                ),
                daemon=True,
            )
            p.start()
            loads.append(p)
        progress: dict[int, dict[str, Any]] = {}

        def drain_results() -> None:
            while True:
                try:
                    _kind, proc, counts = results.get_nowait()
                except Exception:
                    return
                progress[proc] = counts

        def open_now() -> int:
            drain_results()
            return sum(c["opened"] - c["closed"] for c in progress.values())

        series: list[dict[str, Any]] = []
        started = time.monotonic()
        if mode == "peak":
            deadline = started + 600
            while open_now() < sessions and time.monotonic() < deadline:
                time.sleep(1.0)
            ramp = time.monotonic() - started
            time.sleep(2.0)
            peak = _tree_figures(proxy.pid)
            for q in commands:
                q.put("close")
            closed_at = time.monotonic()
            deadline = closed_at + 120
            while _tree_figures(proxy.pid)["fds"] > baseline["fds"] and (
                time.monotonic() < deadline
            ):
                time.sleep(0.5)
            drained = time.monotonic() - closed_at
            time.sleep(settle)
            after = _tree_figures(proxy.pid)
            totals = _collect(results, progress, load_procs)
            return {
                "mode": "peak",
                "sessions": sessions,
                "workers": workers,
                "trim": trim,
                "opened": totals["opened"],
                "failed": totals["failed"],
                "mismatches": totals["mismatches"],
                "ramp_seconds": round(ramp, 1),
                "drain_seconds": round(drained, 1),
                "settle_seconds": settle,
                "baseline": baseline,
                "peak": peak,
                "after_close": after,
                "kb_per_session": round(
                    (peak["rss_mb"] - baseline["rss_mb"]) * 1024 / max(1, totals["opened"]), 2
                ),
            }
        latencies: list[float] = []
        reloads = 0
        end = started + minutes * 60

        async def watch() -> None:
            nonlocal reloads
            stop = asyncio.Event()
            probe = asyncio.ensure_future(_probe(port, key, stop, latencies))
            next_reload = started + reload_every
            while time.monotonic() < end:
                now = time.monotonic()
                if now >= next_reload:
                    os.kill(proxy.pid, signal.SIGHUP)
                    reloads += 1
                    next_reload += reload_every
                series.append(
                    {"t": round(now - started), "open": open_now(), **_tree_figures(proxy.pid)}
                )
                await asyncio.sleep(10.0)
            stop.set()
            await probe

        asyncio.run(watch())
        for q in commands:
            q.put("close")
        totals = _collect(results, progress, load_procs)
        closed_at = time.monotonic()
        deadline = closed_at + 360  # retiring generations drain their last sessions
        while time.monotonic() < deadline:
            figures = _tree_figures(proxy.pid)
            if figures["fds"] <= baseline["fds"] and len(_tree(proxy.pid)) == workers + 1:
                break
            time.sleep(1.0)
        end_figures = _tree_figures(proxy.pid)
        completed = len(proxy.logs_matching("configuration reloaded"))
        errors = [r for r in proxy.logs if r.get("level") == "error"]
        finite = [v for v in latencies if v != float("inf")]
        return {
            "mode": "soak",
            "sessions": sessions,
            "workers": workers,
            "minutes": minutes,
            "reloads_sent": reloads,
            "reloads_completed": completed,
            "totals": totals,
            "probe": {
                "count": len(latencies),
                "failed": len(latencies) - len(finite),
                "p50_ms": round(_percentile(finite, 0.50) * 1000, 1),
                "p99_ms": round(_percentile(finite, 0.99) * 1000, 1),
                "max_ms": round(max(finite, default=float("nan")) * 1000, 1),
            },
            "baseline": baseline,
            "end": end_figures,
            "series": series,
            "error_lines": len(errors),
            "first_error_line": errors[0] if errors else None,
        }
    finally:
        for p in loads:
            p.kill()
        if proxy is not None:
            proxy.kill()
        for dc in dcs:
            dc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


async def _warm(port: int, key: bytes, count: int) -> str:
    for i in range(count):
        session = _Session(port, key, "127.0.0.1", DCS[i % len(DCS)])
        try:
            await session.open()
            if not await session.exchange(b"warm" * 8):
                return "warm-up echo differs"
        except Exception as exc:
            return repr(exc)
        finally:
            session.close()
    return ""


def _collect(results: Any, progress: dict[int, dict[str, Any]], procs: int) -> dict[str, Any]:
    done: set[int] = set()
    deadline = time.monotonic() + 180
    while len(done) < procs and time.monotonic() < deadline:
        try:
            kind, proc, counts = results.get(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:
            break
        progress[proc] = counts
        if kind == "done":
            done.add(proc)
    totals: dict[str, Any] = {"load_procs_done": len(done), "first_error": ""}
    for counts in progress.values():
        for name, value in counts.items():
            if name == "first_error":
                totals["first_error"] = totals["first_error"] or value
            else:
                totals[name] = totals.get(name, 0) + value
    return totals


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.soak.box_soak")
    parser.add_argument("mode", choices=("soak", "peak"))
    parser.add_argument("--sessions", type=int, default=30000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--reload-every", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=20.0, help="seconds between echoes")
    parser.add_argument("--load-procs", type=int, default=4)
    parser.add_argument("--dc-procs", type=int, default=2)
    parser.add_argument("--settle", type=float, default=15.0)
    parser.add_argument("--no-trim", action="store_true")
    args = parser.parse_args(argv)
    result = run(
        args.mode,
        sessions=args.sessions,
        workers=args.workers,
        minutes=args.minutes,
        reload_every=args.reload_every,
        interval=args.interval,
        load_procs=args.load_procs,
        dc_procs=args.dc_procs,
        settle=args.settle,
        trim=not args.no_trim,
    )
    print(json.dumps(result, indent=1))
    if args.mode == "peak":
        return 0 if result["failed"] == 0 and result["mismatches"] == 0 else 1
    totals = result["totals"]
    good = (
        totals.get("mismatches", 0) == 0
        and totals.get("failed", 0) == 0
        and totals.get("cut", 0) == 0
        and result["reloads_completed"] == result["reloads_sent"]
        and result["end"]["fds"] <= result["baseline"]["fds"]
        and result["probe"]["failed"] == 0
    )
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
