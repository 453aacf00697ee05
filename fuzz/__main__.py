"""``python -m fuzz run|replay|seed|list``.

- ``run --seconds N [--target T ...] [--merge]``: the campaign (atheris), N seconds split
  over the targets (all by default); exit status 1 when it found anything;
- ``replay [--target T ...]``: every corpus file through its harness, in this process;
- ``seed``: write the seed inputs (built from the test suite's builders) into the corpora;
- ``list``: the targets and what they cover.
"""

from __future__ import annotations

import argparse
import sys

from fuzz import TARGETS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the fuzz campaign with atheris")
    run.add_argument("--seconds", type=float, required=True, help="total time, split evenly")
    run.add_argument("--target", action="append", choices=list(TARGETS), help="repeatable")
    run.add_argument("--merge", action="store_true", help="minimise the corpus with new inputs")
    replay = commands.add_parser("replay", help="replay the corpora without atheris")
    replay.add_argument("--target", action="append", choices=list(TARGETS))
    commands.add_parser("seed", help="write the seed inputs into the corpora")
    commands.add_parser("list", help="list the targets")
    args = parser.parse_args(argv)

    if args.command == "list":
        for name, what in TARGETS.items():
            print(f"{name:<12} {what}")
        return 0
    if args.command == "seed":
        from fuzz.seeds import write_seeds

        for name, count in write_seeds().items():
            print(f"{name:<12} {count} seed(s)")
        return 0
    targets = args.target or list(TARGETS)
    if args.command == "replay":
        from fuzz.replay import replay_corpus

        failures = 0
        for name in targets:
            count, errors = replay_corpus(name)
            failures += len(errors)
            print(f"{name:<12} {count} input(s), {len(errors)} failure(s)")
            for error in errors:
                print(f"  {error}")
        return 1 if failures else 0
    from fuzz.campaign import run as run_campaign

    results = run_campaign(args.seconds, targets, args.merge)
    return 1 if any(r.findings for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
