"""The benchmark scenarios. Each one returns a result dict (one JSON line):

``{"scenario", "title", "unit", "status": ok|skipped|failed, "reason", "results": {target:
{label, value, cpu_pct, per_core, ...}}, "ratio": {target: x}, "problems": [...]}``

``value`` is the figure as measured, ``cpu_pct`` the proxy process tree's CPU use in the
window (100 = one core), ``per_core`` the figure divided by the cores used (rates only).
``ratio`` compares each target with the no-crypto baseline of the same run (per core for
rates, plain for latency and memory). Scenarios that need a feature the target lacks
(worker pool, metrics, SIGHUP reload) report ``skipped: <reason>``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from bench.common import free_port, kill_tree, taskset_prefix, wait_listening
from bench.harness import (
    DC_NUMBERS,
    REPO_ROOT,
    SESSIONS_PER_PROCESS,
    Context,
    Instance,
    StartError,
    Target,
    Window,
    instance_job,
    measure,
)

Result = dict[str, Any]


@dataclass
class Scenario:
    name: str
    title: str
    unit: str
    run: Callable[[Context, Scenario], Result]
    better: str = "higher"  # or "lower"


class Skip(Exception):
    """The scenario cannot run here; the message says why."""


# -- jobs ---------------------------------------------------------------------------------------
def stream_job(ctx: Context, mode: str, streams: int) -> tuple[dict[str, Any], int, str]:
    s = ctx.settings
    window = s.window_one if streams == 1 else s.window_many
    job = {"kind": "stream", "mode": mode, "msg": s.msg, "window": window, "dcs": list(DC_NUMBERS)}
    return job, streams, "streams"


def handshake_job(ctx: Context) -> tuple[dict[str, Any], int, str]:
    job = {"kind": "handshake", "hs_bytes": ctx.settings.hs_bytes, "dcs": list(DC_NUMBERS)}
    return job, ctx.settings.hs_slots, "slots"


def probe_job(ctx: Context) -> tuple[dict[str, Any], int, str]:
    job = {"kind": "probe", "dcs": list(DC_NUMBERS)}
    return job, ctx.settings.hs_slots, "slots"


def rtt_job(ctx: Context) -> tuple[dict[str, Any], int, str]:
    s = ctx.settings
    job = {"kind": "rtt", "msg": s.rtt_msg, "think": s.rtt_think, "dcs": list(DC_NUMBERS)}
    return job, s.rtt_streams, "streams"


def rate_of(job: dict[str, Any], window: Window) -> float:
    """The figure of a window: MB/s for streams, handshakes/s, or p99 ms for rtt."""
    elapsed = max(window.elapsed, 1e-9)
    if job["kind"] in ("handshake", "probe"):
        return window.completed / elapsed
    if job["kind"] == "rtt":
        return percentile(window.latencies_ns, 99) / 1e6
    relayed = 2 * window.rx if job.get("mode") == "echo" else window.rx
    return relayed / elapsed / 1e6


def percentile(values: list[int], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return float(ordered[index])


# -- checks --------------------------------------------------------------------------------------
def problems_of(ctx: Context, target: Target, window: Window) -> tuple[list[str], list[str]]:
    """(errors, warnings) of a window. Wrong bytes are always errors; failed connections
    are errors in smoke mode and warnings otherwise."""
    errors: list[str] = []
    warnings: list[str] = []
    if window.corrupt:
        errors.append(f"{target.label}: {window.corrupt} connection(s) got wrong bytes")
    if window.dc_errors:
        errors.append(f"{target.label}: fake DC saw {window.dc_errors} wrong stream(s)")
    if window.dc_mismatch:
        text = f"{target.label}: {window.dc_mismatch} connection(s) reached the wrong DC"
        (warnings if target.key == "compare" else errors).append(text)
    if window.failed:
        text = f"{target.label}: {window.failed} connection(s) failed"
        (errors if ctx.settings.strict_failures else warnings).append(text)
    if errors or warnings:
        samples = "; ".join(dict.fromkeys(window.samples))[:600]
        if samples:
            (errors or warnings).append(f"{target.label} samples: {samples}")
    return errors, warnings


def entry(target: Target, value: float, window: Window | None, rate: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"label": target.label, "value": _round(value)}
    if window is not None:
        out["cpu_pct"] = round(window.cpu_pct, 1)
        if rate:
            out["per_core"] = _round(value / window.per_core_factor)
        out["load_cpu_pct"] = _round(window.load_cpu_pct)
        out["proxy_cores_busy_pct"] = _round(window.proxy_cores_busy)
        out["load_cores_busy_pct"] = _round(window.load_cores_busy)
    return out


def _round(value: float) -> float:
    if value != value:  # NaN
        return value
    if abs(value) >= 100:
        return round(value, 1)
    return round(value, 4)


# -- generic rate scenarios ----------------------------------------------------------------------
def rate_scenario(
    job_of: Callable[[Context], tuple[dict[str, Any], int, str]], per_core: bool = True
) -> Callable[[Context, Scenario], Result]:
    """Measure a job on every target, alternating targets ``repeats`` times; keep the
    median run (by the per-core figure) of each target."""

    def run(ctx: Context, sc: Scenario) -> Result:
        job, total, split = job_of(ctx)
        runs: dict[str, list[tuple[float, float, Window]]] = {t.key: [] for t in ctx.targets}
        errors: list[str] = []
        warnings: list[str] = []
        for _ in range(ctx.settings.repeats):
            for target in ctx.targets:
                window = measure(ctx, ctx.instance(target), job, total, split)
                value = rate_of(job, window)
                score = value / window.per_core_factor if per_core else value
                runs[target.key].append((score, value, window))
                e, w = problems_of(ctx, target, window)
                errors += e
                warnings += w
        results = {}
        for target in ctx.targets:
            got = runs[target.key]
            # medians over the repeats (the mean of the middle two for an even count)
            res = entry(target, statistics.median(r[1] for r in got), None, per_core)
            res["cpu_pct"] = round(statistics.median(r[2].cpu_pct for r in got), 1)
            if per_core:
                res["per_core"] = _round(statistics.median(r[0] for r in got))
            for key in ("load_cpu_pct", "proxy_cores_busy", "load_cores_busy"):
                name = key if key.endswith("_pct") else f"{key}_pct"
                res[name] = _round(statistics.median(getattr(r[2], key) for r in got))
            res["runs"] = [_round(r[0]) for r in got]
            latencies = [ns for r in got for ns in r[2].latencies_ns]
            if job["kind"] == "rtt":
                res["p50"] = _round(percentile(latencies, 50) / 1e6)
                res["p99"] = res["value"]
                res["samples_n"] = len(latencies)
            if job["kind"] == "handshake":
                res["hs_p50_ms"] = _round(percentile(latencies, 50) / 1e6)
            results[target.key] = res
        return finish(sc, results, errors, warnings, "per_core" if per_core else "value")

    return run


def finish(
    sc: Scenario, results: dict[str, Any], errors: list[str], warnings: list[str], key: str
) -> Result:
    ratio = {}
    base = results.get("baseline", {}).get(key)
    if base:
        for name, res in results.items():
            if name != "baseline" and res.get(key) is not None:
                ratio[name] = round(res[key] / base, 3)
    return {
        "scenario": sc.name,
        "title": sc.title,
        "unit": sc.unit,
        "better": sc.better,
        "status": "failed" if errors else "ok",
        "reason": "; ".join(errors),
        "results": results,
        "ratio": ratio,
        "ratio_of": key,
        "problems": errors + warnings,
    }


# -- idle sessions -------------------------------------------------------------------------------
def idle_scenario(size_of: Callable[[Context], int]) -> Callable[[Context, Scenario], Result]:
    def run(ctx: Context, sc: Scenario) -> Result:
        count = size_of(ctx)
        results: dict[str, Any] = {}
        errors: list[str] = []
        warnings: list[str] = []
        for target in ctx.targets:
            fresh = ctx.settings.fresh_for_memory  # no memory left over from other scenarios
            inst = ctx.launch(target) if fresh else ctx.instance(target)
            try:
                res, e, w = hold_idle(ctx, target, inst, count)
            finally:
                if fresh:
                    inst.close()
            results[target.key] = res
            errors += e
            warnings += w
        return finish(sc, results, errors, warnings, "value")

    return run


def hold_idle(
    ctx: Context, target: Target, inst: Instance, count: int, **job_extra: Any
) -> tuple[dict[str, Any], list[str], list[str]]:
    """Open ``count`` idle sessions on a fresh instance; RSS and fds per session."""
    s = ctx.settings
    job = {"kind": "idle", "dcs": list(DC_NUMBERS), **job_extra}
    procs = max(s.load_procs, -(-count // SESSIONS_PER_PROCESS))
    # Warm-up: code paths, freelists and the loop's structures get allocated once.
    ctx.dc.reset()
    ready = ctx.load.start(instance_job(ctx, inst, job), min(64, count // 4 + 1), "streams")
    warm = Window(failed=sum(a.get("failed", 0) for a in ready))
    for a in ready:
        warm.samples += a.get("samples", [])
    ctx.load.go()
    ctx.load.stop()
    errors, warnings = problems_of(ctx, target, warm)
    time.sleep(0.3 if count >= 1000 else 0.05)
    rss0, fds0, _ = inst.memory()
    ctx.dc.reset()
    ready = ctx.load.start(instance_job(ctx, inst, job), count, "streams", procs=procs)
    opened = sum(a.get("ok", 0) for a in ready)
    window = Window()
    try:
        settle = 1.0 if count >= 1000 else 0.2
        time.sleep(settle)
        cpu0, t0 = inst.cpu_seconds(), time.monotonic()
        ctx.load.go()
        samples = []
        for _ in range(3):
            time.sleep(settle / 2)
            samples.append(inst.memory())
        cpu1, t1 = inst.cpu_seconds(), time.monotonic()
    finally:
        results = ctx.load.stop()
    for result in results:
        window.failed += result.get("total_failed", 0)
        window.corrupt += result.get("total_corrupt", 0)
        window.samples += result.get("samples", [])
    dc = ctx.dc.stats()
    window.dc_errors = dc.get("errors", 0)
    window.dc_mismatch = dc.get("dc_mismatch", 0)
    window.cpu_pct = 100 * (cpu1 - cpu0) / max(t1 - t0, 1e-6)
    e, w = problems_of(ctx, target, window)
    errors += e
    warnings += w
    rss1 = statistics.median(m[0] for m in samples)
    fds1 = statistics.median(m[1] for m in samples)
    if opened < count:
        (errors if s.strict_failures else warnings).append(
            f"{target.label}: only {opened} of {count} sessions opened"
        )
    per = max(opened, 1)
    res = {
        "label": target.label,
        "value": _round((rss1 - rss0) / per / 1024),
        "cpu_pct": round(window.cpu_pct, 1),
        "sessions": opened,
        "fds_per_session": _round((fds1 - fds0) / per),
        "rss_before_mb": round(rss0 / 2**20, 1),
        "rss_after_mb": round(rss1 / 2**20, 1),
    }
    return res, errors, warnings


# -- features ------------------------------------------------------------------------------------
def feature_targets(ctx: Context, feature: str) -> tuple[list[Target], list[str]]:
    """Targets (baseline excluded) that support ``feature``, and reasons for the others."""
    ok, reasons = [], []
    for target in ctx.targets:
        if target.key == "baseline":
            continue
        supported, reason = ctx.supports(target, feature)
        if supported:
            ok.append(target)
        else:
            reasons.append(reason)
    return ok, reasons


def max_sessions(ctx: Context, sc: Scenario) -> Result:
    s = ctx.settings
    targets, reasons = feature_targets(ctx, "workers")
    if not targets:
        raise Skip("; ".join(reasons))
    results: dict[str, Any] = {}
    errors: list[str] = []
    warnings: list[str] = []
    procs = max(s.load_procs, -(-s.max_sessions_cap // SESSIONS_PER_PROCESS) + 1)
    ctx.dc.ensure(max(s.dc_procs, procs))
    src_ips = [f"127.0.0.{i}" for i in range(2, 10)]
    for target in targets:
        inst = ctx.launch(target, workers=s.max_workers)
        try:
            res, e, w = grow_sessions(ctx, target, inst, procs, src_ips)
        finally:
            inst.close()
        res["workers"] = s.max_workers
        results[target.key] = res
        errors += e
        warnings += w
    out = finish(sc, results, errors, warnings, "value")
    out["note"] = "; ".join(reasons)
    return out


def grow_sessions(
    ctx: Context, target: Target, inst: Instance, procs: int, src_ips: list[str]
) -> tuple[dict[str, Any], list[str], list[str]]:
    s = ctx.settings
    ctx.dc.reset()
    rss0, fds0, _ = inst.memory()
    # Few handshakes in flight: this measures capacity, not a connection storm (a hello that
    # waits in the accept queue longer than the proxy's 3 s timestamp window is refused).
    spec = {"kind": "idle", "dcs": list(DC_NUMBERS), "src_ips": src_ips, "open_concurrency": 32}
    job = instance_job(ctx, inst, spec)
    step = s.max_sessions_step
    ready = ctx.load.start(job, step, "streams", procs=procs)
    opened = sum(a.get("ok", 0) for a in ready)
    failed = sum(a.get("failed", 0) for a in ready)
    open_samples: list[str] = []
    for answer in ready:
        open_samples += answer.get("samples", [])
    stop_reason = "cap"
    deadline = time.monotonic() + s.max_sessions_time
    try:
        while opened < s.max_sessions_cap:
            if failed > step // 100:
                stop_reason = f"{failed} sessions failed to open"
                break
            if time.monotonic() > deadline:
                stop_reason = "time limit"
                break
            if psutil.virtual_memory().available < 1 << 30:
                stop_reason = "less than 1 GiB of memory left"
                break
            if not inst.alive():
                stop_reason = "proxy exited"
                break
            grown = ctx.load.grow(min(step, s.max_sessions_cap - opened), s.setup_timeout)
            opened += sum(a.get("ok", 0) for a in grown)
            failed = sum(a.get("failed", 0) for a in grown)
            for answer in grown:
                open_samples += answer.get("samples", [])
        time.sleep(0.5)
        rss1, fds1, nproc = inst.memory()
        cpu0, t0 = inst.cpu_seconds(), time.monotonic()
        ctx.load.go()
        time.sleep(max(s.duration / 5, 0.2))
        cpu1, t1 = inst.cpu_seconds(), time.monotonic()
    finally:
        results = ctx.load.stop()
    window = Window(cpu_pct=100 * (cpu1 - cpu0) / max(t1 - t0, 1e-6))
    for result in results:
        window.corrupt += result.get("total_corrupt", 0)
        window.failed += result.get("failed", 0)  # sessions dropped while held
        window.samples += result.get("samples", [])
    dc = ctx.dc.stats()
    window.dc_errors = dc.get("errors", 0)
    errors, warnings = problems_of(ctx, target, window)
    per = max(opened, 1)
    res = {
        "label": target.label,
        "value": opened,
        "cpu_pct": round(window.cpu_pct, 1),
        "stopped_by": stop_reason,
        "processes": nproc,
        "rss_total_mb": round(rss1 / 2**20, 1),
        "kb_per_session": _round((rss1 - rss0) / per / 1024),
        "fds_per_session": _round((fds1 - fds0) / per),
    }
    if open_samples:
        res["open_failures"] = list(dict.fromkeys(open_samples))[:5]
    return res, errors, warnings


def _relay_and_handshakes(ctx: Context) -> list[tuple[str, tuple[dict[str, Any], int, str]]]:
    return [
        (
            f"relay {ctx.settings.streams_many} streams",
            stream_job(ctx, "echo", ctx.settings.streams_many),
        ),
        ("handshakes", handshake_job(ctx)),
    ]


def paired(
    ctx: Context,
    sc: Scenario,
    feature: str,
    variant: Callable[[Context, Target], Instance],
    during: Callable[[Instance], None] | None = None,
    change: str = "loss",
) -> Result:
    """Off-vs-on comparison of a feature on relay and handshake jobs (same run, alternated).

    ``variant`` starts the "on" instance (once per repeat, for both jobs). ``change``
    "loss" reports 1 - on/off in percent; "ratio" reports on/off.
    """
    targets, reasons = feature_targets(ctx, feature)
    if not targets:
        raise Skip("; ".join(reasons))
    jobs = _relay_and_handshakes(ctx)
    results: dict[str, Any] = {}
    errors: list[str] = []
    warnings: list[str] = []
    for target in targets:
        scores: dict[str, dict[str, list[float]]] = {
            label: {"off": [], "on": [], "cpu_on": []} for label, _ in jobs
        }
        for _ in range(ctx.settings.repeats):
            for label, (job, total, split) in jobs if ctx.settings.paired_off else []:
                window = measure(ctx, ctx.instance(target), job, total, split)
                scores[label]["off"].append(rate_of(job, window) / window.per_core_factor)
                e, w = problems_of(ctx, target, window)
                errors += e
                warnings += w
            inst = variant(ctx, target)
            try:
                for label, (job, total, split) in jobs:
                    window = measure(ctx, inst, job, total, split, during=during)
                    scores[label]["on"].append(rate_of(job, window) / window.per_core_factor)
                    scores[label]["cpu_on"].append(window.cpu_pct)
                    e, w = problems_of(ctx, target, window)
                    errors += e
                    warnings += w
            finally:
                inst.close()
        res: dict[str, Any] = {"label": target.label}
        worst = None
        for label, got in scores.items():
            on = statistics.median(got["on"])
            off = statistics.median(got["off"]) if got["off"] else float("nan")
            value = (1 - on / off) * 100 if change == "loss" else on / off
            res[label] = {
                "off_per_core": _round(off),
                "on_per_core": _round(on),
                change: _round(value),
                "cpu_pct_on": round(statistics.median(got["cpu_on"]), 1),
            }
            worst = value if worst is None else (max if change == "loss" else min)(worst, value)
        res["value"] = _round(worst if worst is not None else float("nan"))
        results[target.key] = res
    out = finish(sc, results, errors, warnings, "value")
    out["ratio"] = {}
    out["note"] = "; ".join(reasons)
    return out


def metrics_scenario(ctx: Context, sc: Scenario) -> Result:
    def with_metrics(ctx: Context, target: Target) -> Instance:
        port = free_port()
        inst = ctx.launch(target, metrics_port=port)
        scraper = Scraper(port)
        inst.on_close.append(scraper.stopped.set)
        return inst

    return paired(ctx, sc, "metrics", with_metrics)


class Scraper(threading.Thread):
    """Scrapes the metrics endpoint every second while a measurement runs."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/"
        self.stopped = threading.Event()
        self.ok = 0
        self.start()

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            with contextlib.suppress(OSError), urllib.request.urlopen(self.url, timeout=2) as resp:
                resp.read()
                self.ok += 1


def workers_scenario(ctx: Context, sc: Scenario) -> Result:
    n = ctx.settings.pool_workers

    def pool(ctx: Context, target: Target) -> Instance:
        return ctx.launch(target, workers=n)

    out = paired(ctx, sc, "workers", pool, change="ratio")
    out["note"] = (out.get("note") or "") + f" {n} workers vs 1, all pinned to the proxy CPUs"
    return out


def reload_scenario(ctx: Context, sc: Scenario) -> Result:
    every = ctx.settings.reload_every
    last = [0.0]

    def fresh(ctx: Context, target: Target) -> Instance:
        return ctx.launch(target)

    def hup(inst: Instance) -> None:
        now = time.monotonic()
        if now - last[0] >= every:
            last[0] = now
            with contextlib.suppress(ProcessLookupError):
                os.kill(inst.pid, signal.SIGHUP)

    return paired(ctx, sc, "sighup", fresh, during=hup)


def paced_scenario(ctx: Context, sc: Scenario) -> Result:
    """Many downloading connections with the doppelganger's pacing on vs off (mtgworkers
    only: compared proxies have no such switch). Figures: MB/s in total and per
    connection, and proxy CPU seconds per GB relayed; the value is CPU per GB paced over
    CPU per GB unpaced (1.0 = pacing costs nothing per byte)."""
    target = next((t for t in ctx.targets if t.key == "proxy"), None)
    if target is None:
        raise Skip("needs mtgworkers itself (--no-proxy was given)")
    streams = ctx.settings.paced_streams
    job, total, split = stream_job(ctx, "source", streams)
    got: dict[str, dict[str, list[float]]] = {
        mode: {"mbps": [], "cpu_per_gb": [], "cpu_pct": []} for mode in ("off", "on")
    }
    errors: list[str] = []
    warnings: list[str] = []
    for _ in range(ctx.settings.repeats):
        for mode in ("off", "on"):
            inst = ctx.instance(target) if mode == "off" else ctx.launch(target, pacing=True)
            try:
                window = measure(ctx, inst, job, total, split)
            finally:
                if mode == "on":
                    inst.close()
            moved = max(window.rx + window.tx, 1)
            cpu_seconds = window.cpu_pct / 100 * window.elapsed
            got[mode]["mbps"].append(rate_of(job, window))
            got[mode]["cpu_per_gb"].append(cpu_seconds / (moved / 1e9))
            got[mode]["cpu_pct"].append(window.cpu_pct)
            e, w = problems_of(ctx, target, window)
            errors += e
            warnings += w
    res: dict[str, Any] = {"label": target.label, "streams": streams}
    for mode, values in got.items():
        mbps = statistics.median(values["mbps"])
        res[mode] = {
            "mb_per_s": _round(mbps),
            "mb_per_s_per_connection": _round(mbps / streams),
            "cpu_seconds_per_gb": _round(statistics.median(values["cpu_per_gb"])),
            "cpu_pct": round(statistics.median(values["cpu_pct"]), 1),
        }
    res["value"] = _round(res["on"]["cpu_seconds_per_gb"] / res["off"]["cpu_seconds_per_gb"])
    out = finish(sc, {target.key: res}, errors, warnings, "value")
    out["ratio"] = {}
    out["note"] = (
        f"{streams} downloads; paced {res['on']['mb_per_s_per_connection']} MB/s per "
        f"connection, {res['on']['cpu_seconds_per_gb']} CPU s/GB vs "
        f"{res['off']['cpu_seconds_per_gb']} unpaced"
    )
    return out


def probes_scenario(ctx: Context, sc: Scenario) -> Result:
    """Fronted probes vs valid handshakes: proxy CPU per connection of each, same instance.

    A probe is a well-formed ClientHello for the secret's host signed with another key
    (a censor's active probe); the proxy relays it to a local TLS site (bench/tlssite.py,
    on the load CPUs) and the site's ServerHello back, then the probe resets. The value is
    CPU per probe over CPU per full handshake (<= 1: probing costs no more than serving).
    """
    targets = [t for t in ctx.targets if t.key != "baseline"]  # the baseline cannot front
    if not targets:
        raise Skip("needs a proxy that fronts (the baseline does not)")
    port = free_port()
    log = open(ctx.tmp / "tlssite.log", "ab")  # noqa: SIM115 - closed below
    argv = [sys.executable, "bench/tlssite.py", "--listen", f"127.0.0.1:{port}"]
    site = subprocess.Popen(
        [*taskset_prefix(ctx.load_cpus), *argv],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=log,
    )
    results: dict[str, Any] = {}
    errors: list[str] = []
    warnings: list[str] = []
    try:
        wait_listening([port], site, ctx.settings.start_timeout)
        for target in targets:
            inst = ctx.launch(target, fronting_port=port)
            got: dict[str, list[float]] = {"handshake": [], "probe": []}
            try:
                for _ in range(ctx.settings.repeats):
                    for label, (job, total, split) in (
                        ("handshake", handshake_job(ctx)),
                        ("probe", probe_job(ctx)),
                    ):
                        window = measure(ctx, inst, job, total, split)
                        cpu_s = window.cpu_pct / 100 * window.elapsed
                        got[label].append(cpu_s / max(window.completed, 1) * 1e6)
                        e, w = problems_of(ctx, target, window)
                        errors += e
                        warnings += w
            finally:
                inst.close()
            hs_us = statistics.median(got["handshake"])
            probe_us = statistics.median(got["probe"])
            results[target.key] = {
                "label": target.label,
                "value": _round(probe_us / hs_us),
                "cpu_us_per_probe": _round(probe_us),
                "cpu_us_per_handshake": _round(hs_us),
                "runs": {k: [_round(v) for v in vs] for k, vs in got.items()},
            }
    finally:
        kill_tree(site)
        log.close()
    out = finish(sc, results, errors, warnings, "value")
    out["note"] = "; ".join(
        f"{r['label']}: {r['cpu_us_per_probe']} us CPU per probe vs "
        f"{r['cpu_us_per_handshake']} per handshake"
        for r in results.values()
    )
    return out


# -- registry ------------------------------------------------------------------------------------
# -- stalled readers -----------------------------------------------------------------------------
def stalled_scenario(ctx: Context, sc: Scenario) -> Result:
    """RSS per session of ``stalled`` clients that each ask the fake DC for
    ``stalled_bytes`` and stop reading once established: what the proxy buffers in user
    space for a reader that stalls. Also reports the bytes the kernel queues on the
    proxy's own sockets (``ss``), which RSS does not count."""
    s = ctx.settings
    count = s.stalled
    results: dict[str, Any] = {}
    errors: list[str] = []
    warnings: list[str] = []
    job = {
        "kind": "stream",
        "mode": "source",
        "stall": True,
        "source_bytes": s.stalled_bytes,
        "msg": s.msg,
        "window": s.window_many,
        "dcs": list(DC_NUMBERS),
        # a phone's small receive window, and a gentle start: every stream floods the
        # proxy's socket buffers before it stalls, which must not delay the next hellos
        "rcvbuf": 64 * 1024,
        "open_concurrency": 16,
    }
    # mtgworkers twice: as the other scenarios run it, and with its default pacing on
    runs = [(t, t.key, {}) for t in ctx.targets]
    runs += [(t, f"{t.key}_paced", {"pacing": True}) for t in ctx.targets if t.key == "proxy"]
    for target, key, options in runs:
        fresh = s.fresh_for_memory or bool(options)
        inst = ctx.launch(target, **options) if fresh else ctx.instance(target)
        try:
            # warm-up: code paths and the loop's structures get allocated once
            ctx.load.start(instance_job(ctx, inst, job), min(16, count), "streams")
            time.sleep(0.3)
            ctx.load.stop()
            time.sleep(0.3)
            rss0, _, _ = inst.memory()
            queued0 = _kernel_queued(inst.pid)
            ctx.dc.reset()
            ready = ctx.load.start(instance_job(ctx, inst, job), count, "streams")
            opened = sum(a.get("ok", 0) for a in ready)
            try:
                # the buffers fill within moments; wait until RSS stops growing
                rss1, last = rss0, -1
                deadline = time.monotonic() + s.stalled_settle
                while time.monotonic() < deadline and rss1 != last:
                    last = rss1
                    time.sleep(0.5)
                    rss1 = statistics.median(inst.memory()[0] for _ in range(3))
                queued1 = _kernel_queued(inst.pid)
                dc = ctx.dc.stats()
            finally:
                answers = ctx.load.stop()
        finally:
            if fresh:
                inst.close()
        window = Window()
        for answer in answers:
            window.failed += answer.get("total_failed", 0)
            window.corrupt += answer.get("total_corrupt", 0)
            window.samples += answer.get("samples", [])
        window.dc_errors = dc.get("errors", 0)
        e, w = problems_of(ctx, target, window)
        errors += e
        warnings += w
        if opened < count:
            (errors if s.strict_failures else warnings).append(
                f"{target.label}: only {opened} of {count} stalled sessions opened"
            )
        per = max(opened, 1)
        res: dict[str, Any] = {
            "label": target.label + (", paced" if options else ""),
            "value": _round((rss1 - rss0) / per / 1024),
            "sessions": opened,
            "rss_before_mb": round(rss0 / 2**20, 1),
            "rss_after_mb": round(rss1 / 2**20, 1),
        }
        if queued0 is not None and queued1 is not None:
            res["kernel_queued_kb_per_session"] = _round((queued1 - queued0) / per / 1024)
        results[key] = res
    paced = results.pop("proxy_paced", None)
    if paced is not None and "proxy" in results:  # one column per target in the tables
        results["proxy"]["paced"] = paced
    out = finish(sc, results, errors, warnings, "value")
    out["note"] = (
        f"{count} clients each asking for {s.stalled_bytes // 2**20} MB and reading nothing"
    )
    return out


def _kernel_queued(root: int) -> int | None:
    """Bytes in the receive and send queues of every TCP socket of ``root``'s process
    tree (``ss -tnpH``), or None without ``ss``."""
    try:
        pids = {root, *(p.pid for p in psutil.Process(root).children(recursive=True))}
        out = subprocess.run(
            ["ss", "-tnpH"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError, psutil.Error):
        return None
    total = 0
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 6 or not any(f"pid={pid}," in line for pid in pids):
            continue
        total += int(fields[1]) + int(fields[2])
    return total


# -- idle flood ----------------------------------------------------------------------------------
def idle_flood_scenario(ctx: Context, sc: Scenario) -> Result:
    """Handshakes/s of one worker with ``concurrency = flood_limit``, quiet vs. while
    ``flood_holders`` idle connections are held open (each opened again as soon as the
    proxy closes it, bench/idleflood.py). The figure is the share of the quiet rate
    that is kept, in percent (plain rates: the flood's own cost to the proxy counts)."""
    s = ctx.settings
    targets = [t for t in ctx.targets if t.key != "baseline"]  # it has no limit to attack
    job, total, split = handshake_job(ctx)
    results: dict[str, Any] = {}
    errors: list[str] = []
    warnings: list[str] = []
    for target in targets:
        quiet: list[float] = []
        loud: list[float] = []
        failed = 0
        churn: list[float] = []
        for _ in range(s.repeats):
            inst = ctx.launch(target, concurrency=s.flood_limit)
            try:
                window = measure(ctx, inst, job, total, split)
                quiet.append(rate_of(job, window))
                e, w = problems_of(ctx, target, window)
                errors += e
                warnings += w
                with _flooding(ctx, inst.port, s.flood_holders) as flood:
                    before = flood.counts()
                    started = time.monotonic()
                    window = measure(ctx, inst, job, total, split)
                    after = flood.counts()
                    churn.append(
                        (after["closed"] - before["closed"]) / (time.monotonic() - started)
                    )
                loud.append(rate_of(job, window))
                failed += window.failed
                if window.corrupt or window.dc_errors:
                    errors += problems_of(ctx, target, window)[0]
            finally:
                inst.close()
        q, f = statistics.median(quiet), statistics.median(loud)
        results[target.key] = {
            "label": target.label,
            "value": _round(f / q * 100 if q else float("nan")),
            "quiet_hs_per_s": _round(q),
            "flood_hs_per_s": _round(f),
            "failed_during_flood": failed,
            "flood_closed_per_s": _round(statistics.median(churn)),
            "runs_quiet": [_round(v) for v in quiet],
            "runs_flood": [_round(v) for v in loud],
        }
    out = finish(sc, results, errors, warnings, "value")
    out["ratio"] = {}
    out["note"] = (
        f"concurrency {s.flood_limit}, {s.flood_holders} idle connections reopened at once "
        f"when closed, {s.hs_slots} handshake slots"
    )
    return out


class _FloodCounts:
    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.last: dict[str, int] = {"open": 0, "opened": 0, "closed": 0}

    def counts(self) -> dict[str, int]:
        """The flood's newest report (it reports once a second)."""
        while True:
            try:
                line = self.channel._lines.get_nowait()
            except queue.Empty:
                return self.last
            if line is None:
                raise RuntimeError(f"{self.channel.describe()} exited\n{self.channel.tail()}")
            self.last = line


@contextlib.contextmanager
def _flooding(ctx: Context, port: int, holders: int) -> Any:
    """Run bench/idleflood.py against ``port`` on the load CPUs until every holder
    connected at least once."""
    from bench.common import ChildChannel

    argv = [
        sys.executable, "-m", "bench.idleflood", "--port", str(port),
        "--connections", str(holders),
    ]  # fmt: skip
    log = ctx.tmp / f"idleflood-{port}.log"
    channel = ChildChannel("idleflood", argv, log, ctx.load_cpus)
    flood = _FloodCounts(channel)
    try:
        deadline = time.monotonic() + ctx.settings.setup_timeout
        while flood.last["opened"] < holders:
            if time.monotonic() > deadline:
                raise RuntimeError(f"idle flood: only {flood.last} after the set-up time")
            flood.last = channel.recv(deadline - time.monotonic())
        time.sleep(ctx.settings.warmup)
        yield flood
    finally:
        channel.close()


def _idle_small(ctx: Context) -> int:
    return ctx.settings.idle_small


def _idle_large(ctx: Context) -> int:
    return ctx.settings.idle_large


SCENARIOS = [
    Scenario(
        "relay_1",
        "relay, 1 stream, 16 KiB echo",
        "MB/s",
        rate_scenario(lambda ctx: stream_job(ctx, "echo", 1)),
    ),
    Scenario(
        "relay_64",
        "relay, 64 streams, 16 KiB echo",
        "MB/s",
        rate_scenario(lambda ctx: stream_job(ctx, "echo", ctx.settings.streams_many)),
    ),
    Scenario(
        "upload_64",
        "client -> DC only (sink), 64 streams",
        "MB/s",
        rate_scenario(lambda ctx: stream_job(ctx, "sink", ctx.settings.streams_many)),
    ),
    Scenario(
        "download_64",
        "DC -> client only (source), 64 streams",
        "MB/s",
        rate_scenario(lambda ctx: stream_job(ctx, "source", ctx.settings.streams_many)),
    ),
    Scenario(
        "paced",
        "many paced downloads: CPU per GB, pacing on / off",
        "x",
        paced_scenario,
        better="lower",
    ),
    Scenario("handshakes", "full handshakes (connect..close)", "1/s", rate_scenario(handshake_job)),
    Scenario(
        "rtt_128",
        "round trip of 128 B, p99 (p50 in JSON)",
        "ms",
        rate_scenario(rtt_job, per_core=False),
        better="lower",
    ),
    Scenario(
        "idle_1k",
        "RSS per idle session, 1k sessions",
        "KB",
        idle_scenario(_idle_small),
        better="lower",
    ),
    Scenario(
        "idle_9k",
        "RSS per idle session, 9k per worker",
        "KB",
        idle_scenario(_idle_large),
        better="lower",
    ),
    Scenario(
        "probes",
        "fronted probes: proxy CPU per probe / per handshake",
        "x",
        probes_scenario,
        better="lower",
    ),
    Scenario("max_sessions", "most sessions, worker pool", "sessions", max_sessions),
    Scenario(
        "stalled",
        "RSS per stalled reader (download, client reads nothing)",
        "KB",
        stalled_scenario,
        better="lower",
    ),
    Scenario(
        "idle_flood",
        "handshakes kept during an idle-connection flood",
        "% kept",
        idle_flood_scenario,
    ),
    Scenario(
        "metrics", "metrics on vs off, worst loss", "% loss", metrics_scenario, better="lower"
    ),
    Scenario("workers", "N workers vs 1, worst ratio", "x", workers_scenario),
    Scenario(
        "reload",
        "SIGHUP every 0.5 s vs none, worst loss",
        "% loss",
        reload_scenario,
        better="lower",
    ),
]
BY_NAME = {sc.name: sc for sc in SCENARIOS}


def run_scenario(ctx: Context, sc: Scenario) -> Result:
    """Run one scenario; a crash or a start failure becomes a ``failed`` result."""
    started = time.monotonic()

    def bare(status: str, reason: str, **extra: Any) -> Result:
        return {
            "scenario": sc.name,
            "title": sc.title,
            "unit": sc.unit,
            "status": status,
            "reason": reason,
            "results": {},
            "ratio": {},
            **extra,
        }

    try:
        result = sc.run(ctx, sc)
    except Skip as exc:
        result = bare("skipped", str(exc))
    except StartError as exc:
        result = bare("failed", f"start failed: {exc}")
        ctx.drop_instances()
    except Exception as exc:
        result = bare("failed", f"crashed: {exc!r}", traceback=traceback.format_exc())
        ctx.drop_instances()  # do not reuse instances a crash may have left odd
    result["seconds"] = round(time.monotonic() - started, 1)
    return result
