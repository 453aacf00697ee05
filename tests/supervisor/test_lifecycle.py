"""Start and stop: SIGTERM drains and exits 0, SIGQUIT stops at once, a killed supervisor
leaves no worker behind, start-up failures end the process quickly with a clear message."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.supervisor.helpers import (
    EchoStream,
    open_client,
    signal_proxy,
    start_proxy,
    wait_until,
    worker_pids,
)
from tests.support.env import KitSecret, ProxyPool
from tests.support.proxy import REPO_ROOT, to_toml

pytestmark = pytest.mark.e2e


def _connection_refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_sigterm_drains_sessions_in_flight_and_exits_0(
    proxy_factory: ProxyPool, test_secret: KitSecret, tmp_path: Path
) -> None:
    pid_file = tmp_path / "run" / "mtgworkers.pid"
    pid_file.parent.mkdir()
    proxy = start_proxy(
        proxy_factory,
        workers=2,
        overrides={"supervisor": {"graceful-timeout": "10s", "pid-file": str(pid_file)}},
    )
    assert pid_file.read_text() == f"{proxy.pid}\n"
    started = proxy.wait_for_log("supervisor started")
    segments = [started["scoreboard"]]
    assert os.path.exists(segments[0])
    client = open_client(proxy, test_secret.key, test_secret.host)
    stream = EchoStream(client)
    stream.start()
    stream.wait_bytes(64 * 1024, 5)

    signal_proxy(proxy, signal.SIGTERM)
    proxy.wait_for_log("shutting down: draining sessions", graceful_timeout=10.0)
    # nobody accepts any more ...
    wait_until(lambda: _connection_refused(proxy.host, proxy.port), 5, "refused connections")
    # ... but the session in flight goes on with intact bytes
    stream.wait_bytes(stream.bytes + 256 * 1024, 5)
    assert proxy.proc is not None and proxy.proc.poll() is None
    stream.finish()
    client.close()
    ended = time.monotonic()
    assert proxy.proc.wait(5) == 0
    assert time.monotonic() - ended < 3, "the supervisor waited although nothing was left"
    assert not proxy.logs_matching("graceful-timeout passed; closing the remaining sessions")
    proxy.wait_for_log("supervisor stopped")
    for path in segments:
        assert not os.path.exists(path), f"shared memory {path} left behind"
    assert not pid_file.exists()


def test_sigquit_closes_everything_at_once(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    proxy = start_proxy(
        proxy_factory, workers=2, overrides={"supervisor": {"graceful-timeout": "1m"}}
    )
    clients = [open_client(proxy, test_secret.key, test_secret.host) for _ in range(4)]
    signal_proxy(proxy, signal.SIGQUIT)
    assert proxy.proc is not None
    assert proxy.proc.wait(5) == 0
    for client in clients:
        assert client.wait_closed(2) in ("eof", "reset")
        client.close()
    proxy.wait_for_log("shutting down at once")


def test_killed_supervisor_leaves_no_worker_behind(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    proxy = start_proxy(proxy_factory, workers=2)
    pids = worker_pids(proxy)
    assert len(pids) == 2
    client = open_client(proxy, test_secret.key, test_secret.host)
    scoreboard = proxy.wait_for_log("supervisor started")["scoreboard"]
    proxy_factory.started.remove(proxy)  # it cannot exit 0 any more
    os.kill(proxy.pid, signal.SIGKILL)
    assert proxy.proc is not None and proxy.proc.wait(5) == -signal.SIGKILL
    wait_until(lambda: all(_gone(pid) for pid in pids), 3, "the workers to exit")
    assert client.wait_closed(2) in ("eof", "reset")
    client.close()
    # Its shared memory could not be removed by itself; the next start removes it (or any
    # other supervisor starting on this machine: the test suites run several at once).
    assert os.path.exists(scoreboard) or _swept_by_another(proxy_factory, scoreboard)
    second = start_proxy(proxy_factory, workers=1)
    assert not os.path.exists(scoreboard)
    if not _swept_by_another(proxy_factory, scoreboard):
        record = second.wait_for_log(
            "removed shared memory of a supervisor that is gone", path=scoreboard
        )
        assert record["level"] == "info"


def _swept_by_another(proxy_factory: ProxyPool, path: str) -> bool:
    """True when the file is gone but none of this test's proxies logged its removal."""
    ours = any(
        p.logs_matching("removed shared memory of a supervisor that is gone", path=path)
        for p in proxy_factory.started
    )
    return not os.path.exists(path) and not ours


def test_port_taken_by_another_program_fails_fast_with_a_clear_message(
    proxy_factory: ProxyPool,
) -> None:
    proxy = proxy_factory(start=False)
    proxy_factory.started.remove(proxy)
    proxy.config["supervisor"] = {"workers": 2}
    proxy.workdir.mkdir(parents=True, exist_ok=True)
    proxy.config_path.write_text(to_toml(proxy.config))
    with socket.socket() as other:  # a plain listener, without SO_REUSEPORT
        other.bind((proxy.host, proxy.port))
        other.listen()
        began = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "mtgworkers", "run", str(proxy.config_path)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        took = time.monotonic() - began
    assert result.returncode == 1
    assert took < 5
    assert result.stderr == (
        f"mtgworkers: error: cannot listen on 127.0.0.1:{proxy.port}: Address already in use\n"
    )
    assert "worker started" not in result.stdout


def test_pid_file_of_a_running_proxy_is_refused(proxy_factory: ProxyPool, tmp_path: Path) -> None:
    pid_file = tmp_path / "taken.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # this test process is alive
    proxy = proxy_factory(start=False)
    proxy.config["supervisor"] = {"pid-file": str(pid_file)}
    with pytest.raises(RuntimeError) as failed:
        proxy.start(timeout=10)
    proxy_factory.started.remove(proxy)
    assert f"pid-file {pid_file}: another proxy is already running as pid {os.getpid()}" in str(
        failed.value
    )
    assert pid_file.read_text() == f"{os.getpid()}\n"


def test_sigusr1_is_harmless(proxy_factory: ProxyPool, test_secret: KitSecret) -> None:
    proxy = start_proxy(proxy_factory, workers=2)
    pids = worker_pids(proxy)
    mark = proxy.mark()
    signal_proxy(proxy, signal.SIGUSR1)
    proxy.wait_for_log("SIGUSR1: logging to stdout, nothing to reopen", since=mark)
    proxy.wait_for_log("SIGUSR1: logging to stdout, nothing to reopen", since=mark, count=3)
    assert worker_pids(proxy) == pids
    open_client(proxy, test_secret.key, test_secret.host).close()
