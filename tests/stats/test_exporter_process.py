"""The exporter process's handle: start, restart with back-off, clean-up, bind errors."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from mtgworkers.config import HostPort, Prometheus
from mtgworkers.stats.prometheus import MULTIPROC_ENV
from supervisor.exporter.httpd import ExporterError
from supervisor.exporter.process import Exporter, describe_exit
from tests.stats.helpers import scrape_series, value, wait_until


def _prometheus(port: int = 0, path: str = "/") -> Prometheus:
    return Prometheus(
        enabled=True, bind_to=HostPort("127.0.0.1", port), http_path=path, metric_prefix="mtg"
    )


def _exits(caplog: Any) -> list[tuple[int, str]]:
    return [
        (r.pid, r.status)
        for r in caplog.records
        if r.getMessage() == "metrics exporter exited; restarting it"
    ]


def test_exporter_process_is_restarted_and_cleaned_up(tmp_path: Path, caplog: Any) -> None:
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
        with caplog.at_level(logging.WARNING, logger="mtgworkers.exporter"):
            wait_until(lambda: (exporter.poll(), exporter.pid is None)[1], 5, "the exit to be seen")
        assert _exits(caplog) == [(first, "signal SIGKILL")]
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


def test_an_exit_reaped_by_the_owner_is_handed_to_the_handle(tmp_path: Path, caplog: Any) -> None:
    # The supervisor reaps every child with waitpid(-1): the exporter's status must still
    # reach its handle, which logs it and restarts the exporter with the back-off.
    exporter = Exporter(_prometheus(), directory_parent=str(tmp_path))
    try:
        exporter.start()
        port = exporter.address[1]
        first = exporter.pid
        assert first is not None
        assert not exporter.owns(os.getpid())
        assert exporter.owns(first)
        os.kill(first, signal.SIGKILL)
        status = os.waitpid(first, 0)[1]  # what the arbiter's reap loop does
        exporter.reaped(status)
        now = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="mtgworkers.exporter"):
            exporter.poll(now)
        assert _exits(caplog) == [(first, "signal SIGKILL")]
        assert exporter.pid is None and not exporter.owns(first)
        exporter.poll(now + 0.5)
        assert exporter.pid is None  # back-off: 1 s after the first death
        exporter.poll(now + 1.1)
        assert exporter.pid not in (None, first)
        assert value(scrape_series(port), "mtg_replay_attacks_total") == 0
        second = exporter.pid
        assert second is not None
        # An exit status is reported as such; the second death in a row waits 2 s.
        os.kill(second, signal.SIGTERM)  # the exporter stops cleanly on SIGTERM
        exporter.reaped(os.waitpid(second, 0)[1])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mtgworkers.exporter"):
            exporter.poll(now + 2)
        assert _exits(caplog) == [(second, "exit status 0")]
        assert [r.restart_in for r in caplog.records] == [2.0]
    finally:
        exporter.close()  # nothing left to wait for: the handle knows both are gone
    assert not os.path.exists(exporter.multiproc_dir)


def test_exit_descriptions() -> None:
    assert describe_exit(0) == "exit status 0"
    assert describe_exit(1) == "exit status 1"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "signal SIGSEGV"
    assert describe_exit(-200) == "signal 200"
