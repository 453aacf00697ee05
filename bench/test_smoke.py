"""CI check of the benchmark suite: ``python -m bench smoke`` must pass.

The smoke mode runs every scenario at tiny scale against the real proxy and the baseline
relay, verifying every relayed byte; it exits non-zero if a byte is wrong or a scenario
crashes. No timing is asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
@pytest.mark.bench_smoke
def test_bench_smoke_passes() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "smoke"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summary = "\n".join(f"{r['scenario']}: {r['status']} {r.get('reason', '')}" for r in results)
    assert proc.returncode == 0, f"smoke failed:\n{summary}\n--- stderr ---\n{proc.stderr[-3000:]}"
    names = {r["scenario"] for r in results}
    from bench.scenarios import SCENARIOS

    assert names == {sc.name for sc in SCENARIOS}, f"scenarios missing from the output: {summary}"
    assert all(r["status"] in ("ok", "skipped") for r in results), summary
    # the core scenarios can never be skipped: they need nothing but `mtgworkers run`
    core = {"relay_1", "relay_64", "handshakes", "rtt_128", "idle_1k", "idle_9k"}
    assert all(r["status"] == "ok" for r in results if r["scenario"] in core), summary
