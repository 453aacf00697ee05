"""The exporter process's handle: start, restart with back-off, clean-up, bind errors."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from mtgworkers.config import HostPort, Prometheus
from mtgworkers.stats.prometheus import MULTIPROC_ENV
from supervisor.exporter.httpd import ExporterError
from supervisor.exporter.process import Exporter
from tests.stats.helpers import scrape_series, value, wait_until


def _prometheus(port: int = 0, path: str = "/") -> Prometheus:
    return Prometheus(
        enabled=True, bind_to=HostPort("127.0.0.1", port), http_path=path, metric_prefix="mtg"
    )


def test_exporter_process_is_restarted_and_cleaned_up(tmp_path: Path) -> None:
    saved = os.environ.get(MULTIPROC_ENV)
    exporter = Exporter(_prometheus(), directory_parent=str(tmp_path))
    try:
        assert os.environ[MULTIPROC_ENV] == exporter.multiproc_dir
        exporter.start()
        port = exporter.address[1]
        assert value(scrape_series(port), "mtg_replay_attacks_total") == 0
        first = exporter.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        # The listening socket stays in this process: a scrape now waits in its queue
        # and is answered by the replacement.
        wait_until(lambda: (exporter.poll(), exporter.pid is None)[1], 5, "the exit to be seen")
        now = time.monotonic()
        exporter.poll(now + 0.5)
        assert exporter.pid is None  # back-off: 1 s after the first death
        exporter.poll(now + 1.1)
        assert exporter.pid not in (None, first)
        assert value(scrape_series(port, "/x"), "mtg_domain_fronting_total") == 0
    finally:
        exporter.close()
    assert not os.path.exists(exporter.multiproc_dir)
    assert os.environ.get(MULTIPROC_ENV) == saved
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_exporter_bind_error_names_the_address(tmp_path: Path) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        before = set(os.listdir(tmp_path))
        with pytest.raises(ExporterError, match=f"127.0.0.1:{port}"):
            Exporter(_prometheus(port), directory_parent=str(tmp_path))
        assert set(os.listdir(tmp_path)) == before  # its directory was removed again
    finally:
        taken.close()
