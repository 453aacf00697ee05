"""Benchmark runner: ``python -m bench run`` (or ``python bench/run.py run``).

Commands:
  run     every scenario at full scale; writes bench/results/latest.json, the tables in
          bench/README.md and bench/results/latest.png
  smoke   every scenario at tiny scale (about 15 s); exit code 1 if a byte was wrong or a
          scenario crashed; writes nothing in the repository
  list    the scenario names

Each scenario prints one JSON line and one markdown table row to stdout; progress goes to
stderr. See bench/README.md for the method and for ``--compare``.
"""

from __future__ import annotations

import argparse
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

if __package__ in (None, ""):  # ``python bench/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report
from bench.common import REPO_ROOT
from bench.harness import BaselineTarget, CompareTarget, Context, MtgTarget, Settings, Target
from bench.scenarios import BY_NAME, SCENARIOS, run_scenario

RESULTS_DIR = REPO_ROOT / "bench" / "results"
README = REPO_ROOT / "bench" / "README.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("command", nargs="?", default="run", choices=("run", "smoke", "list"))
    parser.add_argument("--scenarios", help="comma-separated scenario names (default: all)")
    parser.add_argument(
        "--compare",
        metavar="COMMAND",
        help="also measure this proxy command; placeholders {config} {port} {dc_port} "
        "{dc_ports} {secret} {host} {python} {workers} {metrics_port} (and BENCH_* env vars)",
    )
    parser.add_argument("--compare-label", default="compare", help="name of --compare in tables")
    parser.add_argument("--no-proxy", action="store_true", help="skip mtgworkers (compare only)")
    parser.add_argument("--duration", type=float, help="seconds per measurement window")
    parser.add_argument("--warmup", type=float, help="seconds of load before each window")
    parser.add_argument("--repeats", type=int, help="alternating runs per target (median kept)")
    parser.add_argument("--max-workers", type=int, help="worker pool size for max_sessions")
    parser.add_argument("--max-sessions", type=int, help="session cap for max_sessions")
    parser.add_argument("--load-procs", type=int, help="load generator processes")
    parser.add_argument("--dc-procs", type=int, help="fake DC processes")
    parser.add_argument("--proxy-cpus", help="CPU list for the proxy (default: first CPU)")
    parser.add_argument("--load-cpus", help="CPU list for load + fake DC (default: the others)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the proxy")
    parser.add_argument("--no-readme", action="store_true", help="do not touch bench/README.md")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/latest.json)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    return parser.parse_args(argv)


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


def choose_cpus(args: argparse.Namespace) -> tuple[list[int] | None, list[int] | None]:
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


def settings_for(args: argparse.Namespace) -> Settings:
    settings = Settings.smoke() if args.command == "smoke" else Settings()
    for name in ("duration", "warmup", "repeats", "load_procs", "dc_procs", "max_workers"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    if args.max_sessions is not None:
        settings.max_sessions_cap = args.max_sessions
        settings.max_sessions_step = max(args.max_sessions // 9, 1)
    return settings


def targets_for(args: argparse.Namespace) -> list[Target]:
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


def write_outputs(args: argparse.Namespace, results: list[dict[str, Any]], meta: dict) -> None:
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
