"""Every corpus file through its harness, in-process, without atheris."""

from __future__ import annotations

import traceback
from pathlib import Path

from fuzz import CORPUS
from fuzz.targets import load


def replay_corpus(target: str, corpus_root: Path = CORPUS) -> tuple[int, list[str]]:
    """(inputs run, one line per input that broke the contract) for ``corpus_root/target``."""
    harness = load(target)
    errors = []
    folder = corpus_root / target
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    for path in files:
        try:
            harness.fuzz_one(path.read_bytes())
        except Exception as exc:  # anything escaping a harness is a bug
            where = traceback.extract_tb(exc.__traceback__)[-1]
            errors.append(
                f"{path.name}: {type(exc).__name__}: {exc} ({where.filename}:{where.lineno})"
            )
    return len(files), errors
