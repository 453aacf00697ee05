"""Every corpus file through its harness, in-process, without atheris."""

from __future__ import annotations

import traceback

from fuzz import CORPUS
from fuzz.targets import load


def replay_corpus(target: str) -> tuple[int, list[str]]:
    """(inputs run, one line per input that broke the contract)."""
    harness = load(target)
    errors = []
    files = sorted(p for p in (CORPUS / target).iterdir() if p.is_file())
    for path in files:
        try:
            harness.fuzz_one(path.read_bytes())
        except Exception as exc:  # anything escaping a harness is a bug
            where = traceback.extract_tb(exc.__traceback__)[-1]
            errors.append(
                f"{path.name}: {type(exc).__name__}: {exc} ({where.filename}:{where.lineno})"
            )
    return len(files), errors
