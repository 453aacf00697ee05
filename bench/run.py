"""Benchmark runner: ``python -m bench run`` (or ``python bench/run.py run``).

Usage:
  bench [run | smoke | list] [options]
  bench (-h | --help)

Commands:
  run     every scenario at full scale (the default); writes bench/results/latest.json,
          the tables in bench/README.md and bench/results/latest.png
  smoke   every scenario at tiny scale (about 15 s); exit code 1 if a byte was wrong or a
          scenario crashed; writes nothing in the repository
  list    the scenario names

Options:
  --scenarios=NAMES      comma-separated scenario names (default: all)
  --compare=COMMAND      also measure this proxy command; placeholders {config} {port}
                         {dc_port} {dc_ports} {secret} {host} {python} {workers}
                         {metrics_port} (and BENCH_* env vars)
  --compare-label=NAME   name of --compare in tables [default: compare]
  --no-proxy             skip mtgworkers (compare only)
  --duration=SECONDS     seconds per measurement window (default: 5)
  --warmup=SECONDS       seconds of load before each window (default: 1)
  --repeats=N            alternating runs per target, the median is kept (default: 2)
  --max-workers=N        worker pool size for max_sessions (default: 6)
  --max-sessions=N       session cap for max_sessions (default: 54000)
  --load-procs=N         load generator processes (default: 2)
  --dc-procs=N           fake DC processes (default: 2)
  --proxy-cpus=CPUS      CPU list for the proxy, e.g. 0 or 0-1,3 (default: first CPU)
  --load-cpus=CPUS       CPU list for load + fake DC (default: the others)
  --python=PATH          interpreter for the proxy (default: the one running this)
  --no-readme            do not touch bench/README.md
  --out=PATH             results JSON (default: bench/results/latest.json)
  --keep-tmp             keep configs and logs
  -h --help              show this help

The numeric defaults above are those of run; smoke has its own tiny preset, and an option
given overrides either. Each scenario prints one JSON line and one markdown table row to
stdout; progress goes to stderr. See bench/README.md for the method and for ``--compare``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from docopt import DocoptExit, docopt

if __package__ in (None, ""):  # ``python bench/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report
from bench.common import REPO_ROOT
from bench.harness import BaselineTarget, CompareTarget, Context, MtgTarget, Settings, Target
from bench.scenarios import BY_NAME, SCENARIOS, run_scenario

RESULTS_DIR = REPO_ROOT / "bench" / "results"
README = REPO_ROOT / "bench" / "README.md"


@dataclasses.dataclass(frozen=True)
class Args:
    """The command line, parsed and typed (``None``: not given, the preset applies)."""

    command: str
    scenarios: str | None
    compare: str | None
    compare_label: str
    no_proxy: bool
    duration: float | None
    warmup: float | None
    repeats: int | None
    max_workers: int | None
    max_sessions: int | None
    load_procs: int | None
    dc_procs: int | None
    proxy_cpus: str | None
    load_cpus: str | None
    python: str
    no_readme: bool
    out: Path | None
    keep_tmp: bool


def _number(opts: dict[str, Any], name: str, kind: type[int] | type[float]) -> Any:
    text = opts[name]
    if text is None:
        return None
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise DocoptExit(f"{name}: {text!r} is not {what}") from None


def parse_args(argv: list[str] | None) -> Args:
    opts = docopt(str(__doc__), argv=sys.argv[1:] if argv is None else list(argv))
    command = "smoke" if opts["smoke"] else "list" if opts["list"] else "run"
    return Args(
        command=command,
        scenarios=opts["--scenarios"],
        compare=opts["--compare"],
        compare_label=opts["--compare-label"],
        no_proxy=bool(opts["--no-proxy"]),
        duration=_number(opts, "--duration", float),
        warmup=_number(opts, "--warmup", float),
        repeats=_number(opts, "--repeats", int),
        max_workers=_number(opts, "--max-workers", int),
        max_sessions=_number(opts, "--max-sessions", int),
        load_procs=_number(opts, "--load-procs", int),
        dc_procs=_number(opts, "--dc-procs", int),
        proxy_cpus=opts["--proxy-cpus"],
        load_cpus=opts["--load-cpus"],
        python=opts["--python"] or sys.executable,
        no_readme=bool(opts["--no-readme"]),
        out=Path(opts["--out"]) if opts["--out"] is not None else None,
        keep_tmp=bool(opts["--keep-tmp"]),
    )


def _cpus(text: str | None) -> list[int] | None:
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += range(int(lo), int(hi) + 1)
        elif part:
            out.append(int(part))
    return out


def choose_cpus(args: Args) -> tuple[list[int] | None, list[int] | None]:
    """Proxy on one core, everything else on the rest (no pinning on a 1-CPU machine)."""
    proxy, load = _cpus(args.proxy_cpus), _cpus(args.load_cpus)
    available = sorted(os.sched_getaffinity(0))
    if proxy is None and load is None and len(available) >= 2:
        proxy, load = available[:1], available[1:]
    elif proxy is not None and load is None:
        load = [c for c in available if c not in proxy] or None
    elif load is not None and proxy is None:
        proxy = [c for c in available if c not in load] or None
    return proxy, load


def settings_for(args: Args) -> Settings:
    settings = Settings.smoke() if args.command == "smoke" else Settings()
    for name in ("duration", "warmup", "repeats", "load_procs", "dc_procs", "max_workers"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    if args.max_sessions is not None:
        settings.max_sessions_cap = args.max_sessions
        settings.max_sessions_step = max(args.max_sessions // 9, 1)
    return settings


def targets_for(args: Args) -> list[Target]:
    targets: list[Target] = []
    if not args.no_proxy:
        targets.append(MtgTarget(args.python))
    if args.compare:
        targets.append(CompareTarget(args.compare, args.compare_label))
    targets.append(BaselineTarget(args.python))
    return targets


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    python = platform.python_version()
    return f"{os.cpu_count()} x {model}, Linux {platform.release()}, Python {python}"


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "list":
        for sc in SCENARIOS:
            print(f"{sc.name:14} {sc.title} [{sc.unit}]")
        return 0
    selected = SCENARIOS
    if args.scenarios:
        unknown = [n for n in args.scenarios.split(",") if n not in BY_NAME]
        if unknown:
            log(f"unknown scenario(s): {', '.join(unknown)}; see `python -m bench list`")
            return 2
        selected = [BY_NAME[n] for n in args.scenarios.split(",")]
    settings = settings_for(args)
    proxy_cpus, load_cpus = choose_cpus(args)
    targets = targets_for(args)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": command.strip(),
        "revision": git_revision(),
        "proxy_cpus": ",".join(map(str, proxy_cpus)) if proxy_cpus else "any",
        "load_cpus": ",".join(map(str, load_cpus)) if load_cpus else "any",
        "settings": vars(settings),
        "settings_summary": (
            f"{settings.duration:g} s windows after {settings.warmup:g} s warm-up, "
            f"median of {settings.repeats} alternated runs, {settings.load_procs} load "
            f"processes, {settings.dc_procs} fake DC processes"
        ),
        "targets": {t.key: t.label for t in targets},
    }
    if args.compare:
        meta["compare_command"] = args.compare
    log(
        f"bench {args.command}: {len(selected)} scenario(s), proxy CPUs {meta['proxy_cpus']}, "
        f"load CPUs {meta['load_cpus']}"
    )
    results: list[dict[str, Any]] = []
    ctx = Context(settings, targets, proxy_cpus, load_cpus, keep_tmp=args.keep_tmp)
    interrupted = False
    try:
        ctx.start()
        print(report.header([{"results": {t.key: {"label": t.label} for t in targets}}]))
        for sc in selected:
            log(f"-- {sc.name}: {sc.title}")
            result = run_scenario(ctx, sc)
            results.append(result)
            print(json.dumps(result, default=str))
            print(report.row(result, [t.key for t in targets if t.key != "baseline"]))
            sys.stdout.flush()
            if result["status"] != "ok":
                log(f"   {result['status']}: {result.get('reason', '')}")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping every process")
    finally:
        if args.keep_tmp:
            log(f"configs and logs kept in {ctx.tmp}")
        ctx.close()
    meta["seconds"] = round(time.monotonic() - started, 1)
    failed = [r["scenario"] for r in results if r["status"] == "failed"]
    log(f"done in {meta['seconds']} s; failed: {', '.join(failed) or 'none'}")
    if args.command == "run" and not interrupted:
        write_outputs(args, results, meta)
    if interrupted:
        return 130
    return 1 if failed else 0


def write_outputs(args: Args, results: list[dict[str, Any]], meta: dict) -> None:
    out = args.out or RESULTS_DIR / "latest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "scenarios": results, "targets": report.target_rows(results)}
    out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    log(f"wrote {out}")
    problem = report.chart(results, out.with_suffix(".png"), meta)
    log(problem or f"wrote {out.with_suffix('.png')}")
    if not args.no_readme:
        report.update_readme(README, results, meta)
        log(f"updated {README}")


if __name__ == "__main__":
    sys.exit(main())
