"""``python -m fuzz.worker TARGET [libFuzzer flags and corpus dirs]``: one atheris process.

Started by :mod:`fuzz.campaign`, which reads its libFuzzer output. ``FUZZ_ARGV0`` names
the executable libFuzzer re-runs for ``-merge=1`` (a Python script cannot be re-run by
itself, so the campaign writes a small wrapper).
"""

from __future__ import annotations

import os
import sys

import atheris


def main() -> None:
    name, flags = sys.argv[1], sys.argv[2:]
    from fuzz import INSTRUMENT, targets

    with atheris.instrument_imports(include=list(INSTRUMENT[name])):
        harness = targets.load(name)
    argv0 = os.environ.get("FUZZ_ARGV0", sys.argv[0])
    atheris.Setup([argv0, f"-max_len={harness.MAX_LEN}", *flags], harness.fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
