"""Process management for the benchmark: targets (the proxy, the baseline relay, a compared
command), the fake DC and load generator pools, feature probes, and the measurement window.

Everything started here runs in its own process group and is killed (whole tree) when the
:class:`Context` closes, whatever happened.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    COUNTER_NAMES,
    COUNTERS,
    REPO_ROOT,
    ChildChannel,
    busy_pct,
    cpu_busy_ticks,
    free_port,
    kill_tree,
    listening_ports,
    pin,
    split_count,
    taskset_prefix,
    tree_cpu_seconds,
    tree_memory,
    wait_listening,
)

DC_NUMBERS = (1, 2, 3, 4, 5)
# The secret's host name: the proxy resolves it at start (SNI-DNS check); "localhost" is
# answered from /etc/hosts, so no DNS query leaves the machine.
BENCH_HOST = "localhost"
SESSIONS_PER_PROCESS = 15000  # load/DC process capacity (20k open files each here)


@dataclass
class Settings:
    """Scale of a run (``full`` and ``smoke`` presets, overridable from the CLI)."""

    duration: float = 5.0
    warmup: float = 1.0
    repeats: int = 2
    msg: int = 16384
    streams_many: int = 64
    paced_streams: int = 256  # the paced scenario: many connections, each capped
    window_one: int = 256 * 1024
    window_many: int = 64 * 1024
    hs_slots: int = 64
    hs_bytes: int = 128
    rtt_streams: int = 8
    rtt_msg: int = 128
    rtt_think: float = 0.001
    idle_small: int = 1000
    idle_large: int = 9000
    max_workers: int = 6
    max_sessions_cap: int = 54000
    max_sessions_step: int = 6000
    max_sessions_time: float = 240.0
    stalled: int = 200  # stalled: clients that stop reading
    stalled_bytes: int = 64 * 2**20  # stalled: what each asks the fake DC for
    stalled_settle: float = 10.0  # stalled: longest wait for the buffers to fill
    flood_limit: int = 1000  # idle_flood: concurrency
    flood_holders: int = 1200  # idle_flood: idle connections held open
    pool_workers: int = 2
    reload_every: float = 0.5
    load_procs: int = 2
    dc_procs: int = 2
    setup_timeout: float = 60.0
    start_timeout: float = 15.0
    probe_wait: float = 3.0
    strict_failures: bool = False  # smoke: any failed connection fails the scenario
    fresh_for_memory: bool = True  # memory scenarios start their own instance
    paired_off: bool = True  # feature scenarios also measure "off" (smoke: only "on")

    @classmethod
    def smoke(cls) -> Settings:
        return cls(
            duration=0.15,
            warmup=0.02,
            repeats=1,
            streams_many=8,
            paced_streams=8,
            window_one=64 * 1024,
            window_many=32 * 1024,
            hs_slots=8,
            rtt_streams=2,
            idle_small=40,
            idle_large=120,
            max_workers=2,
            max_sessions_cap=300,
            max_sessions_step=150,
            max_sessions_time=10.0,
            stalled=8,
            stalled_settle=1.0,
            flood_limit=40,
            flood_holders=60,
            load_procs=2,
            dc_procs=1,
            setup_timeout=10.0,
            start_timeout=8.0,
            probe_wait=0.4,
            strict_failures=True,
            fresh_for_memory=False,
            paired_off=False,
        )


class StartError(RuntimeError):
    """A target did not start (its log tail is in the message)."""


# -- running targets --------------------------------------------------------------------------
class Instance:
    """A running proxy (or baseline, or compared command) pinned to the proxy CPUs."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        log_path: Path,
        cpus: Sequence[int] | None,
        env: dict[str, str] | None,
        timeout: float,
    ) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        self.verify_hmac = True
        self.max_record = 16379
        self.on_close: list[Callable[[], object]] = []
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [*taskset_prefix(cpus), *argv],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=dict(os.environ, **(env or {})),
            start_new_session=True,
        )
        pin(self.proc.pid, cpus)
        try:
            wait_listening([port], self.proc, timeout)
        except RuntimeError as exc:
            self.close()
            raise StartError(f"{name}: {exc}\n{self.tail()}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def memory(self) -> tuple[int, int, int]:
        return tree_memory(self.pid)

    def tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def close(self) -> None:
        for callback in self.on_close:
            callback()
        self.on_close = []
        kill_tree(self.proc)
        with contextlib.suppress(OSError):
            self._log.close()


class Target:
    """Something that relays for the load generator: knows how to start itself."""

    key = "target"
    label = "target"
    verify_hmac = True
    max_record = 16379  # mtg's largest record payload; other proxies may use TLS's 2^14 + 256

    def argv(self, ctx: Context, port: int, options: dict[str, Any]) -> tuple[list[str], dict]:
        raise NotImplementedError

    def declares(self, feature: str) -> bool | None:
        """True/False when the target knows without trying; None = probe it."""
        return None

    def launch(self, ctx: Context, **options: Any) -> Instance:
        port = free_port()
        argv, env = self.argv(ctx, port, options)
        log = ctx.tmp / f"{self.key}-{next(ctx.launch_ids)}.log"
        inst = Instance(
            self.label, argv, port, log, ctx.proxy_cpus, env, ctx.settings.start_timeout
        )
        inst.verify_hmac = self.verify_hmac
        inst.max_record = self.max_record
        ctx.every_instance.append(inst)  # closed with the context whatever happens
        return inst


def mtg_config(ctx: Context, port: int, options: dict[str, Any], *, ours: bool = False) -> str:
    """A bench config for ``mtgworkers run`` (also handed to compared commands).

    ``ours`` adds the keys only this mtgworkers knows: pacing is off unless
    ``options["pacing"]``, so the relay scenarios measure the relay engine, and the
    ``paced`` scenario turns it on. Compared commands get mtg's keys only."""
    lines = [
        f'secret = "{ctx.secret}"',
        f'bind-to = "127.0.0.1:{port}"',
        f"concurrency = {int(options.get('concurrency') or 65535)}",
        'public-ipv4 = "127.0.0.1"',
        "",
        "[network.timeout]",
        'idle = "5m"',
        "",
        "[domain-fronting]",
        'ip = "127.0.0.1"',
        # nothing listens on port 9 (fronting fails at once) unless a scenario runs a site
        f"port = {int(options.get('fronting_port', 9))}",
        "",
        "[dc-overrides]",
    ]
    for dc, dc_port in zip(DC_NUMBERS, ctx.dc_ports, strict=True):
        lines.append(f'{dc} = ["127.0.0.1:{dc_port}"]')
    # Instances are stopped with SIGTERM: a short drain keeps runs quick.
    lines += ["", "[supervisor]", 'graceful-timeout = "1s"']
    if options.get("workers"):
        lines.append(f"workers = {int(options['workers'])}")
    if ours:
        pacing = "true" if options.get("pacing") else "false"
        lines += ["", "[defense.doppelganger]", f"pacing = {pacing}"]
    if options.get("metrics_port"):
        lines += [
            "",
            "[stats.prometheus]",
            "enabled = true",
            f'bind-to = "127.0.0.1:{options["metrics_port"]}"',
        ]
    return "\n".join(lines) + "\n"


class MtgTarget(Target):
    key = "proxy"
    label = "mtgworkers"

    def __init__(self, python: str) -> None:
        self.python = python

    def argv(self, ctx: Context, port: int, options: dict[str, Any]) -> tuple[list[str], dict]:
        path = ctx.tmp / f"mtgworkers-{port}.toml"
        path.write_text(mtg_config(ctx, port, options, ours=True))
        return [self.python, "-m", "mtgworkers", "run", str(path)], {}


class BaselineTarget(Target):
    key = "baseline"
    label = "baseline"
    verify_hmac = False  # its welcome packet is canned (no HMAC: no crypto at all)

    def __init__(self, python: str) -> None:
        self.python = python

    def argv(self, ctx: Context, port: int, options: dict[str, Any]) -> tuple[list[str], dict]:
        argv = [self.python, str(REPO_ROOT / "bench" / "baseline_relay.py")]
        argv += ["--listen", f"127.0.0.1:{port}"]
        for dc_port in ctx.dc_tls_ports:
            argv += ["--dc", f"127.0.0.1:{dc_port}"]
        return argv, {}

    def declares(self, feature: str) -> bool | None:
        return False


class CompareTarget(Target):
    """Any command line; see bench/README.md for the placeholders."""

    key = "compare"
    max_record = 16384 + 256  # TLS's limit (mtprotoproxy writes 16408-byte records)

    def __init__(self, template: str, label: str = "compare") -> None:
        self.template = template
        self.label = label

    def argv(self, ctx: Context, port: int, options: dict[str, Any]) -> tuple[list[str], dict]:
        path = ctx.tmp / f"compare-{port}.toml"
        path.write_text(mtg_config(ctx, port, options))
        values = {
            "config": str(path),
            "port": str(port),
            "dc_port": str(ctx.dc_ports[0]),
            "dc_ports": ",".join(str(p) for p in ctx.dc_ports),
            "secret": ctx.secret,
            "host": BENCH_HOST,
            "python": sys.executable,
            "workers": str(options.get("workers") or 1),
            "metrics_port": str(options.get("metrics_port") or ""),
        }
        try:
            command = self.template.format_map(values)
        except (KeyError, IndexError, ValueError) as exc:
            raise StartError(
                f"--compare: bad placeholder {exc}; known: {', '.join(sorted(values))}"
            ) from None
        env = {f"BENCH_{k.upper()}": v for k, v in values.items()}
        if not any(op in command for op in (";", "&", "|", "\n", "(")):
            command = "exec " + command  # the proxy itself is the root: signals reach it
        return ["/bin/sh", "-c", command], env

    def declares(self, feature: str) -> bool | None:
        if feature == "workers":
            return "{workers}" in self.template
        if feature == "metrics":
            return "{metrics_port}" in self.template or None
        return None


# -- helper process pools ------------------------------------------------------------------------
def _ask(channels: Sequence[ChildChannel], message: dict[str, Any], expect: str, timeout: float):
    """Send ``message`` to every channel and collect one ``expect`` event from each."""
    for channel in channels:
        channel.send(message)
    deadline = time.monotonic() + timeout
    answers = []
    for channel in channels:
        while True:
            answer = channel.recv(deadline - time.monotonic())
            if answer.get("event") == expect:
                answers.append(answer)
                break
            if answer.get("event") == "error":
                raise RuntimeError(f"{channel.describe()}: {answer.get('message')}")
    return answers


class DCPool:
    """Fake DC processes sharing the DC ports (SO_REUSEPORT)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.procs: list[ChildChannel] = []

    def ensure(self, count: int) -> None:
        ctx = self.ctx
        new = []
        while len(self.procs) < count:
            argv = [sys.executable, "-m", "bench.fakedc", "--secret", ctx.secret]
            argv += ["--obfs2-ports", ",".join(str(p) for p in ctx.dc_ports)]
            argv += ["--tls-ports", ",".join(str(p) for p in ctx.dc_tls_ports)]
            log = ctx.tmp / f"fakedc-{len(self.procs)}.log"
            channel = ChildChannel(f"fakedc-{len(self.procs)}", argv, log, ctx.load_cpus)
            self.procs.append(channel)
            new.append(channel)
        for channel in new:
            answer = channel.recv(20.0)
            if answer.get("event") != "ready":
                raise RuntimeError(f"fake DC did not start: {answer}\n{channel.tail()}")

    def stats(self) -> dict[str, Any]:
        total: dict[str, Any] = {"samples": []}
        for answer in _ask(self.procs, {"cmd": "stats"}, "stats", 10.0):
            for key, value in answer.items():
                if key == "samples":
                    total["samples"] += value
                elif isinstance(value, int):
                    total[key] = total.get(key, 0) + value
        return total

    def reset(self) -> None:
        _ask(self.procs, {"cmd": "reset"}, "reset", 10.0)

    def close(self) -> None:
        for channel in self.procs:
            with contextlib.suppress(Exception):
                channel.send({"cmd": "exit"})
        for channel in self.procs:
            channel.close()
        self.procs = []


class LoadPool:
    """Load generator processes (``bench.loadgen``), each publishing its counters to a
    small shared file that the runner reads at the edges of a measurement window."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.procs: list[ChildChannel] = []
        self.boards: list[mmap.mmap] = []
        self.active: list[ChildChannel] = []

    def ensure(self, count: int) -> None:
        new = []
        while len(self.procs) < count:
            name = f"loadgen-{len(self.procs)}"
            log = self.ctx.tmp / f"{name}.log"
            board_path = self.ctx.tmp / f"{name}.counters"
            board_path.write_bytes(bytes(COUNTERS.size))
            with open(board_path, "rb") as f:
                self.boards.append(mmap.mmap(f.fileno(), COUNTERS.size, access=mmap.ACCESS_READ))
            argv = [sys.executable, "-m", "bench.loadgen", "--counters", str(board_path)]
            channel = ChildChannel(name, argv, log, self.ctx.load_cpus)
            self.procs.append(channel)
            new.append(channel)
        for channel in new:
            answer = channel.recv(20.0)
            if answer.get("event") != "hello":
                raise RuntimeError(f"load generator did not start: {answer}\n{channel.tail()}")

    def start(self, job: dict[str, Any], total: int, split_key: str, procs: int | None = None):
        """Start ``job`` with ``total`` streams/slots spread over the pool; wait until ready."""
        count = min(procs or self.ctx.settings.load_procs, max(total, 1))
        self.ensure(count)
        shares = split_count(total, count)
        self.active = self.procs[:count]
        for channel, share in zip(self.active, shares, strict=True):
            channel.send({"cmd": "start", "job": dict(job, **{split_key: share})})
        timeout = self.ctx.settings.setup_timeout + 15.0
        deadline = time.monotonic() + timeout
        answers = []
        for channel in self.active:
            while True:
                answer = channel.recv(deadline - time.monotonic())
                if answer.get("event") == "ready":
                    answers.append(answer)
                    break
                if answer.get("event") == "error":
                    raise RuntimeError(f"{channel.describe()}: {answer.get('message')}")
        return answers

    def grow(self, total: int, timeout: float) -> list[dict[str, Any]]:
        shares = split_count(total, len(self.active))
        for channel, share in zip(self.active, shares, strict=True):
            channel.send({"cmd": "grow", "n": share, "timeout": timeout})
        deadline = time.monotonic() + timeout + 15.0
        answers = []
        for channel in self.active:
            while True:
                answer = channel.recv(deadline - time.monotonic())
                if answer.get("event") == "grown":
                    answers.append(answer)
                    break
                if answer.get("event") == "error":
                    raise RuntimeError(f"{channel.describe()}: {answer.get('message')}")
        return answers

    def snapshot(self) -> dict[str, int]:
        """Counters of the active load processes, summed (read from the shared files)."""
        total = dict.fromkeys(COUNTER_NAMES, 0)
        for channel in self.active:
            values = COUNTERS.unpack_from(self.boards[self.procs.index(channel)], 0)
            for name, value in zip(COUNTER_NAMES, values, strict=False):
                total[name] += value
        return total

    def go(self) -> None:
        for channel in self.active:
            channel.send({"cmd": "go"})
        for channel in self.active:
            while channel.recv(10.0).get("event") != "going":
                pass

    def stop(self) -> list[dict[str, Any]]:
        results = _ask(self.active, {"cmd": "stop"}, "result", 30.0)
        deadline = time.monotonic() + 30.0
        for channel in self.active:
            while channel.recv(deadline - time.monotonic()).get("event") != "stopped":
                pass
        self.active = []
        return results

    def close(self) -> None:
        for channel in self.procs:
            with contextlib.suppress(Exception):
                channel.send({"cmd": "exit"})
        for channel in self.procs:
            channel.close()
        self.procs = []
        for board in self.boards:
            board.close()
        self.boards = []


class CpuProbe:
    """CPU use between construction and finish(): the proxy tree, the load side, and how
    busy the proxy's and the load's cores were (to see other work on a noisy machine)."""

    def __init__(self, ctx: Context, instance: Instance) -> None:
        self.ctx = ctx
        self.instance = instance
        self.t0 = time.monotonic()
        self.proxy0 = instance.cpu_seconds()
        self.load0 = ctx.load_cpu_seconds()
        self.ticks0 = cpu_busy_ticks()

    def finish(self, window: Window) -> float:
        ctx = self.ctx
        proxy1, load1, ticks1 = (
            self.instance.cpu_seconds(),
            ctx.load_cpu_seconds(),
            cpu_busy_ticks(),
        )
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        window.cpu_pct = 100.0 * (proxy1 - self.proxy0) / elapsed
        window.load_cpu_pct = 100.0 * (load1 - self.load0) / elapsed
        all_cpus = sorted(ticks1)
        window.proxy_cores_busy = busy_pct(self.ticks0, ticks1, ctx.proxy_cpus or all_cpus)
        window.load_cores_busy = busy_pct(self.ticks0, ticks1, ctx.load_cpus or all_cpus)
        return elapsed


# -- measurement window -----------------------------------------------------------------------
@dataclass
class Window:
    """What one measurement window saw, summed over the load processes."""

    elapsed: float = 0.0
    cpu_pct: float = 0.0
    rx: int = 0
    tx: int = 0
    completed: int = 0
    established: int = 0
    failed: int = 0
    corrupt: int = 0
    dc_errors: int = 0
    dc_mismatch: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    load_cpu_pct: float = float("nan")  # load generators + fake DCs + runner
    proxy_cores_busy: float = float("nan")  # busy % of the proxy's CPUs (anyone's work)
    load_cores_busy: float = float("nan")

    @property
    def per_core_factor(self) -> float:
        """Divide a rate by this to get it per fully used proxy core."""
        return max(self.cpu_pct, 1.0) / 100.0


TRACE = bool(os.environ.get("BENCH_TRACE"))
_T0 = time.monotonic()


def trace(message: str) -> None:
    """Timestamped progress on stderr when BENCH_TRACE is set."""
    if TRACE:
        sys.stderr.write(f"[{time.monotonic() - _T0:8.3f}] {message}\n")


def instance_job(ctx: Context, instance: Instance, job: dict[str, Any]) -> dict[str, Any]:
    """``job`` aimed at ``instance``."""
    out = dict(job, host="127.0.0.1", port=instance.port, secret=ctx.secret)
    out["verify_hmac"] = instance.verify_hmac
    out["max_record"] = instance.max_record
    out.setdefault("setup_timeout", ctx.settings.setup_timeout)
    return out


def measure(
    ctx: Context,
    instance: Instance,
    job: dict[str, Any],
    total: int,
    split_key: str,
    during: Any = None,
) -> Window:
    """Run ``job`` against ``instance``: set up, warm up, then one measured window.

    ``during`` (optional) is called repeatedly inside the window with the instance (used
    to send SIGHUP). Proxy CPU is sampled over the whole process tree at both window ends.
    """
    settings = ctx.settings
    ctx.dc.reset()
    job = instance_job(ctx, instance, job)
    trace(f"measure {instance.name} {job['kind']} x{total}: start")
    ctx.load.start(job, total, split_key)
    trace("  ready")
    window = Window()
    try:
        time.sleep(settings.warmup)
        if job["kind"] in ("rtt", "handshake", "probe"):
            ctx.load.go()  # opens the latency window (the rates come from the counters)
        before = ctx.load.snapshot()
        probe = CpuProbe(ctx, instance)
        end = time.monotonic() + settings.duration
        while time.monotonic() < end:
            if during is not None:
                during(instance)
            time.sleep(min(0.05, max(end - time.monotonic(), 0)))
        after = ctx.load.snapshot()
        window.elapsed = probe.finish(window)
    finally:
        trace("  window closed")
        results = ctx.load.stop()
        trace("  stopped")
    for key in ("rx", "tx", "completed", "established"):
        setattr(window, key, after[key] - before[key])
    for result in results:
        # totals since the job started: set-up failures count too
        window.failed += result.get("total_failed", 0)
        window.corrupt += result.get("total_corrupt", 0)
        window.latencies_ns += result.get("latencies_ns", [])
        window.samples += result.get("samples", [])
    dc = ctx.dc.stats()
    window.dc_errors = dc.get("errors", 0)
    window.dc_mismatch = dc.get("dc_mismatch", 0)
    window.samples += [f"fake DC: {s}" for s in dc.get("samples", [])]
    trace("  dc stats")
    if not instance.alive():
        window.samples.append(f"{instance.name} exited during the measurement")
        window.failed += 1
    return window


# -- context ------------------------------------------------------------------------------------
class Context:
    """Everything a run shares: settings, secret, ports, pools, targets, probes."""

    def __init__(
        self,
        settings: Settings,
        targets: list[Target],
        proxy_cpus: list[int] | None,
        load_cpus: list[int] | None,
        keep_tmp: bool = False,
    ) -> None:
        self.settings = settings
        self.targets = targets
        self.proxy_cpus = proxy_cpus
        self.load_cpus = load_cpus
        self.keep_tmp = keep_tmp
        self.tmp = Path(tempfile.mkdtemp(prefix="mtgw-bench-"))
        self.secret = "ee" + os.urandom(16).hex() + BENCH_HOST.encode().hex()
        self.dc_ports = [free_port() for _ in DC_NUMBERS]
        self.dc_tls_ports = [free_port() for _ in DC_NUMBERS]
        self.launch_ids = itertools.count(1)
        self.every_instance: list[Instance] = []
        self.features: dict[tuple[str, str], tuple[bool, str]] = {}
        self.dc = DCPool(self)
        self.load = LoadPool(self)
        self._cached: dict[str, Instance] = {}
        self._pool_lock = threading.Lock()
        pin(os.getpid(), load_cpus)

    def load_cpu_seconds(self) -> float:
        """CPU seconds of the load generators, fake DCs and this runner."""
        pids = [c.proc.pid for c in (*self.load.procs, *self.dc.procs)]
        own = os.times()
        return sum(tree_cpu_seconds(pid) for pid in pids) + own.user + own.system

    def start(self) -> None:
        """Start the helper pools and probe the targets' features, all at once."""
        jobs = [
            threading.Thread(target=self.probe_target, args=(target,), daemon=True)
            for target in self.targets
        ]
        for job in jobs:
            job.start()
        self.dc.ensure(self.settings.dc_procs)
        self.load.ensure(self.settings.load_procs)
        for job in jobs:
            job.join(self.settings.start_timeout * 4 + 30)
        # Start every target's default instance at once (the first scenario needs them).
        errors: list[BaseException] = []

        def first_instance(target: Target) -> None:
            try:
                self.instance(target)
            except BaseException as exc:  # reported by the scenario that needs it
                errors.append(exc)

        jobs = [
            threading.Thread(target=first_instance, args=(target,), daemon=True)
            for target in self.targets
        ]
        for job in jobs:
            job.start()
        for job in jobs:
            job.join(self.settings.start_timeout * 2 + 30)

    def probe_target(self, target: Target) -> None:
        """Decide every feature of ``target`` (declared, or probed on one instance)."""
        unknown = []
        for feature in FEATURES:
            declared = target.declares(feature)
            if declared is False:
                self.features[(target.key, feature)] = (
                    False,
                    f"{target.label} has no {feature} support",
                )
            else:
                unknown.append(feature)
        if unknown:
            trace(f"probe {target.label} {unknown}")
            for feature, answer in probe(self, target, unknown).items():
                self.features[(target.key, feature)] = answer
            trace(f"  probed {target.label}: {self.features}")

    def instance(self, target: Target) -> Instance:
        """A running default instance of ``target``, reused between scenarios."""
        inst = self._cached.get(target.key)
        if inst is not None and inst.alive() and inst.port in listening_ports():
            return inst
        if inst is not None:
            inst.close()
        inst = self.launch(target)
        self._cached[target.key] = inst
        return inst

    def launch(self, target: Target, **options: Any) -> Instance:
        """Start ``target`` and wait until a whole session works through it (a listening
        socket is not enough: a supervisor may listen before its workers serve).

        The default is one worker for targets with a worker pool."""
        if "workers" not in options and self.supports(target, "workers")[0]:
            options["workers"] = 1
        trace(f"launch {target.label} {options}")
        inst = target.launch(self, **options)
        trace("  listening")
        try:
            self.wait_serving(inst)
            trace("  serving")
        except BaseException:
            inst.close()
            raise
        return inst

    def wait_serving(self, inst: Instance) -> None:
        job = instance_job(self, inst, {"kind": "idle", "dcs": [2]})
        job["timeout"] = job["setup_timeout"] = self.settings.start_timeout
        with self._pool_lock:  # instances may start in parallel; the pool is not shared
            ready = self.load.start(job, 1, "streams", procs=1)
            answers = self.load.stop()
        if not ready[0].get("ok"):
            samples = "; ".join(ready[0].get("samples", []) + answers[0].get("samples", []))
            raise StartError(f"{inst.name} does not relay a session: {samples}\n{inst.tail()}")

    def drop_instances(self) -> None:
        for inst in self._cached.values():
            inst.close()
        self._cached = {}

    def supports(self, target: Target, feature: str) -> tuple[bool, str]:
        """(supported, reason) for ``workers``/``metrics``/``sighup``, probed by trying."""
        if (target.key, feature) not in self.features:
            self.probe_target(target)
        return self.features.get((target.key, feature), (False, "probe did not finish"))

    def close(self) -> None:
        self.drop_instances()
        for inst in self.every_instance:
            inst.close()
        self.load.close()
        self.dc.close()
        if not self.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _last_log_line(inst_or_text: str) -> str:
    lines = [line for line in inst_or_text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


FEATURES = ("workers", "metrics", "sighup")  # sighup last: it may end the instance


def probe_options(features: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if "workers" in features:
        options["workers"] = 2
    if "metrics" in features:
        options["metrics_port"] = free_port()
    return options


def probe(ctx: Context, target: Target, features: Sequence[str]) -> dict[str, tuple[bool, str]]:
    """Try ``features`` together on one fresh instance (one start instead of three); if
    that instance does not start, try each feature alone. Never raises."""
    options = probe_options(features)
    try:
        inst = target.launch(ctx, **options)
    except StartError as exc:
        if len(features) > 1:
            out: dict[str, tuple[bool, str]] = {}
            for feature in features:
                out.update(probe(ctx, target, [feature]))
            return out
        text = _last_log_line(str(exc))
        return {features[0]: (False, f"`{target.label}` does not start with it set: {text}")}
    try:
        return {
            feature: check_feature(ctx, target, inst, feature, options)
            for feature in FEATURES
            if feature in features
        }
    finally:
        trace(f"  probe {','.join(features)}: closing")
        inst.close()


def check_feature(
    ctx: Context, target: Target, inst: Instance, feature: str, options: dict[str, Any]
) -> tuple[bool, str]:
    wait = ctx.settings.probe_wait
    if feature == "workers":
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if inst.memory()[2] >= 3 or not inst.alive():  # supervisor + 2 workers
                break
            time.sleep(0.05)
        processes = inst.memory()[2]
        if processes < 3:
            return False, f"[supervisor] workers = 2 runs {processes} process(es)"
        return True, ""
    if feature == "metrics":
        port = options["metrics_port"]
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and port not in listening_ports():
            time.sleep(0.05)
        if port not in listening_ports():
            return False, "[stats.prometheus] is accepted but nothing serves metrics"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3) as resp:
                if resp.status != 200:
                    return False, f"metrics endpoint answers HTTP {resp.status}"
        except OSError as exc:
            return False, f"metrics endpoint does not answer: {exc}"
        return True, ""
    if feature == "sighup":
        if not inst.alive():
            return False, f"`{target.label}` exited before SIGHUP could be tried"
        os.kill(inst.pid, signal.SIGHUP)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and inst.alive():
            time.sleep(0.05)
        if not inst.alive():
            return False, f"SIGHUP ends `{target.label}` (exit code {inst.proc.returncode})"
        if inst.port not in listening_ports():
            return False, "the listener is gone after SIGHUP"
        return True, ""
    return False, f"unknown feature {feature}"
