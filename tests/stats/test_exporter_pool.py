"""Pool counters in shared memory and the pool metrics the exporter makes of them and of
the scoreboard."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from supervisor import shm
from supervisor.exporter.exposition import Scraper, render_text
from supervisor.exporter.pool import PoolCounters, SharedPoolStats, restart_reason
from supervisor.states import WorkerState
from tests.stats.helpers import parse, value


def test_pool_metrics_from_shared_memory(metrics_dir: str, tmp_path: Path) -> None:
    board = shm.Scoreboard.create(8, str(tmp_path))
    counters = PoolCounters.create(str(tmp_path), started_at=1_700_000_000.5)
    try:
        ready = board.claim(0, 1, time.time())
        board.set_pid(ready, 4242)
        board.set_state(ready, WorkerState.READY)
        board.set_sample(
            ready, rss=50 << 20, cpu_user=1.5, cpu_system=0.25, cpu_percent=3, fds=17, sampled_at=1
        )
        booting = board.claim(1, 2, time.time())  # forked a moment ago: PID not set yet
        retiring = board.claim(0, 1, time.time())
        board.set_pid(retiring, 4343)
        board.set_state(retiring, WorkerState.RETIRING)
        board.limiter(retiring, 100).try_acquire()
        counters.worker_restarted(restart_reason(-9))
        counters.worker_restarted(restart_reason(1))
        counters.worker_restarted("max_rss")
        counters.worker_restarted("signal")
        counters.worker_restarted("timeout")
        counters.reload_finished(True)
        counters.reload_finished(False)
        counters.reload_finished(True)
        with pytest.raises(ValueError):
            counters.worker_restarted("bored")
        # The exporter maps both segments read-only by path.
        source = SharedPoolStats.attach(board.path, counters.path)
        series = parse(render_text(Scraper(metrics_dir, "mtg", source).families()).decode())
        assert booting >= 0
    finally:
        counters.close()
        board.close()
    assert value(series, "mtg_workers", state="ready") == 1
    assert value(series, "mtg_workers", state="booting") == 1
    assert value(series, "mtg_workers", state="retiring") == 1
    worker = {"slot": "0", "pid": "4242"}
    assert value(series, "mtg_worker_resident_memory_bytes", **worker) == 50 << 20
    assert value(series, "mtg_worker_cpu_seconds_total", **worker) == 1.75
    assert value(series, "mtg_worker_open_fds", **worker) == 17
    assert value(series, "mtg_worker_sessions", slot="0", pid="4343") == 1
    assert ("mtg_worker_open_fds", "4343") not in {
        (name, dict(labels).get("pid")) for name, s in series.items() for labels in s
    }  # never sampled: no resource series yet
    assert value(series, "mtg_worker_restarts_total", reason="signal") == 2
    assert value(series, "mtg_worker_restarts_total", reason="exit") == 1
    assert value(series, "mtg_worker_restarts_total", reason="max_rss") == 1
    assert value(series, "mtg_worker_restarts_total", reason="timeout") == 1
    assert value(series, "mtg_reloads_total", result="success") == 2
    assert value(series, "mtg_reloads_total", result="failure") == 1
    assert value(series, "mtg_supervisor_start_time_seconds") == 1_700_000_000.5
