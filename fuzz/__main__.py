"""The fuzz campaign over every parser of the proxy (docs/fuzzing.md), run as
``python -m fuzz COMMAND`` from the repository's top folder.

Usage:
  fuzz run --seconds=N [--target=T]... [--merge] [--corpus=DIR] [--findings=DIR]
  fuzz replay [--target=T]... [--corpus=DIR]
  fuzz seed [--target=T]... [--dry-run] [DIR]
  fuzz list
  fuzz (-h | --help)

Commands:
  run     The campaign with atheris (libFuzzer): N seconds split evenly over the targets
          (all by default). Prints per target the inputs executed, libFuzzer's cov: figure
          and the findings; exit status 1 when it found anything.
  replay  Every file of the corpora through its harness, in this process, without
          atheris; exit status 1 when one broke the contract.
  seed    Write the seed inputs (built from the test suite's builders, dnspython, haproxy's
          header formats and config.example.toml) into DIR/<target>/; without DIR, only
          say how many would be new in fuzz/corpus/ (`seed fuzz/corpus` writes there).
  list    The targets and what they cover.

Options:
  --seconds=N     Total time of the campaign, in seconds.
  --target=T      A target (repeatable; `list` names them); all when left out.
  --merge         Replace each corpus by libFuzzer's minimisation of it plus the new inputs.
  --corpus=DIR    The folder with one corpus folder per target [default: fuzz/corpus].
  --findings=DIR  Where findings are kept, one folder per target [default: fuzz/findings].
  --dry-run       Only print where the seeds would go and how many there are.
"""

from __future__ import annotations

import sys
from pathlib import Path

from docopt import DocoptExit, docopt

from fuzz import CORPUS, ROOT, TARGETS


def _folder(value: str | None, default: Path) -> Path:
    """A folder option: the documented default is the package's own folder."""
    if value is None or value == f"fuzz/{default.name}":
        return default
    return Path(value)


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    try:
        args = docopt(doc, argv, default_help=True)
    except DocoptExit as exc:
        print(exc, file=sys.stderr)
        return 2
    targets: list[str] = args["--target"] or list(TARGETS)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        names = ", ".join(unknown)
        print(f"unknown target(s): {names}; see `python -m fuzz list`", file=sys.stderr)
        return 2

    if args["list"]:
        for name, what in TARGETS.items():
            print(f"{name:<12} {what}")
        return 0
    if args["seed"]:
        from fuzz.seeds import build_seeds, seed_name, write_seeds

        dest = _folder(args["DIR"], CORPUS)
        if args["--dry-run"] or args["DIR"] is None:
            for name, seeds in build_seeds(targets).items():
                new = sum(not (dest / name / seed_name(d)).exists() for d in seeds)
                print(f"{name:<12} {len(seeds)} seed(s), {new} new, would go to {dest / name}")
            if args["DIR"] is None:
                print(f"nothing written: name the folder, e.g. python -m fuzz seed {dest}")
            return 0
        for name, count in write_seeds(dest, targets).items():
            print(f"{name:<12} {count} new seed(s) in {dest / name}")
        return 0
    corpus = _folder(args["--corpus"], CORPUS)
    if args["replay"]:
        from fuzz.replay import replay_corpus

        failures = 0
        for name in targets:
            count, errors = replay_corpus(name, corpus)
            failures += len(errors)
            print(f"{name:<12} {count} input(s), {len(errors)} failure(s)")
            for error in errors:
                print(f"  {error}")
        return 1 if failures else 0
    from fuzz.campaign import run as run_campaign

    try:
        seconds = float(args["--seconds"])
    except ValueError:
        print(f"--seconds: not a number: {args['--seconds']!r}", file=sys.stderr)
        return 2
    if seconds <= 0:
        print("--seconds: must be more than 0", file=sys.stderr)
        return 2
    findings = _folder(args["--findings"], ROOT / "findings")
    results = run_campaign(seconds, targets, args["--merge"], sys.stdout, corpus, findings)
    return 1 if any(r.findings for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
