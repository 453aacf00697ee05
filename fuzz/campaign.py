"""The campaign: one atheris (libFuzzer) process per target, its figures, the findings.

Each target gets an equal share of the time and runs on its corpus (``fuzz/corpus/<t>/``,
read only); new inputs go to a scratch directory. A finding (crash, timeout, memory limit)
is kept under ``fuzz/findings/<target>/`` and the target is started again for the rest of
its time, at most :data:`MAX_RESTARTS` times. With ``merge`` the corpus is replaced by
libFuzzer's ``-merge=1`` minimisation of corpus plus new inputs; files named
``regress-*`` (inputs that once found a bug) are always kept.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from fuzz import CORPUS, ROOT, TARGETS

FINDINGS = ROOT / "findings"
MAX_RESTARTS = 5
UNIT_TIMEOUT = 10  # seconds one input may take before it is a finding
RSS_LIMIT_MB = 2048
_STATUS = re.compile(r"^#(\d+)\s+\S+\s+cov: (\d+) ft: (\d+)")
_EXECUTED = re.compile(r"^stat::number_of_executed_units: (\d+)", re.MULTILINE)
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


@dataclass
class Result:
    target: str
    executed: int = 0
    cov: int = 0
    features: int = 0
    corpus_before: int = 0
    corpus_after: int = 0
    new_inputs: int = 0
    findings: list[str] = field(default_factory=list)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def _wrapper(scratch: Path, target: str) -> Path:
    """An executable libFuzzer can re-run for -merge=1 (it re-executes its argv[0])."""
    path = scratch / f"run-{target}"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fuzz.worker {target} "$@"\n')
    path.chmod(0o755)
    return path


def _worker(target: str, wrapper: Path, args: list[str], log: Path) -> tuple[int, str]:
    env = {**os.environ, "FUZZ_ARGV0": str(wrapper)}
    with log.open("w") as out:
        code = subprocess.call(
            [sys.executable, "-m", "fuzz.worker", target, *args],
            cwd=ROOT.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return code, log.read_text(errors="replace")


def _finding_summary(text: str, artifact: str) -> str:
    lines = text.splitlines()
    reason = ""
    for index, line in enumerate(lines):
        if "Uncaught Python exception" in line and index + 1 < len(lines):
            reason = lines[index + 1].strip()
            break
        if "ERROR: libFuzzer:" in line:
            reason = line.split("ERROR: libFuzzer:", 1)[1].strip()
    return f"{artifact}: {reason or 'see the log'}"


def run_target(
    target: str,
    seconds: float,
    scratch: Path,
    merge: bool,
    corpus_root: Path = CORPUS,
    findings_root: Path = FINDINGS,
) -> Result:
    result = Result(target)
    corpus = corpus_root / target
    corpus.mkdir(parents=True, exist_ok=True)
    result.corpus_before = len(_files(corpus))
    fresh = scratch / f"new-{target}"
    fresh.mkdir()
    found = findings_root / target
    found.mkdir(parents=True, exist_ok=True)
    wrapper = _wrapper(scratch, target)
    deadline = time.monotonic() + seconds
    seen: set[str] = set()
    for attempt in range(MAX_RESTARTS + 1):
        left = int(deadline - time.monotonic())
        if left < 1 or (attempt and not left):
            break
        log = scratch / f"{target}-{attempt}.log"
        _, text = _worker(
            target,
            wrapper,
            [
                f"-max_total_time={left}",
                f"-timeout={UNIT_TIMEOUT}",
                f"-rss_limit_mb={RSS_LIMIT_MB}",
                f"-artifact_prefix={found}/",
                "-print_final_stats=1",
                str(fresh),
                str(corpus),
            ],
            log,
        )
        statuses = [m for m in map(_STATUS.match, text.splitlines()) if m]
        if statuses:
            result.cov = max(result.cov, int(statuses[-1][2]))
            result.features = max(result.features, int(statuses[-1][3]))
        executed = _EXECUTED.search(text)
        if executed:
            result.executed += int(executed[1])
        elif statuses:
            result.executed += int(statuses[-1][1])
        artifacts = _ARTIFACT.findall(text)
        if not artifacts:
            break
        for artifact in artifacts:
            summary = _finding_summary(text, artifact)
            key = summary.split(": ", 1)[-1]
            if key not in seen:
                seen.add(key)
                result.findings.append(summary)
            else:
                Path(artifact).unlink(missing_ok=True)  # the same bug again
    result.new_inputs = len(_files(fresh))
    if merge:
        merged = scratch / f"merged-{target}"
        merged.mkdir()
        _worker(
            target,
            wrapper,
            ["-merge=1", str(merged), str(corpus), str(fresh)],
            scratch / f"{target}-merge.log",
        )
        if _files(merged):
            keep = [p for p in _files(corpus) if p.name.startswith("regress-")]
            for path in _files(corpus):
                if path not in keep:
                    path.unlink()
            for path in _files(merged):
                shutil.copy(path, corpus / path.name)
    result.corpus_after = len(_files(corpus))
    return result


def run(
    seconds: float,
    targets: list[str],
    merge: bool,
    out: TextIO = sys.stdout,
    corpus_root: Path = CORPUS,
    findings_root: Path = FINDINGS,
) -> list[Result]:
    """Run the campaign: ``seconds`` split evenly over ``targets``; prints one line each.

    ``corpus_root`` and ``findings_root`` hold one folder per target (by default the
    repository's ``fuzz/corpus/`` and ``fuzz/findings/``).
    """
    share = seconds / len(targets)
    results = []
    print(f"fuzz: {len(targets)} target(s), {share:.0f}s each", file=out, flush=True)
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        for target in targets:
            result = run_target(target, share, Path(tmp), merge, corpus_root, findings_root)
            results.append(result)
            print(format_result(result), file=out, flush=True)
            for finding in result.findings:
                print(f"  finding: {finding}", file=out, flush=True)
    total = sum(len(r.findings) for r in results)
    print(f"fuzz: done, {total} finding(s)", file=out, flush=True)
    return results


def format_result(r: Result) -> str:
    return (
        f"{r.target:<12} executed {r.executed:>9}  cov {r.cov:>5}  ft {r.features:>6}  "
        f"new {r.new_inputs:>4}  corpus {r.corpus_before}->{r.corpus_after}  "
        f"findings {len(r.findings)}"
    )


assert set(TARGETS)  # at least one target
