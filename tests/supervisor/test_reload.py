"""SIGHUP: new generation first, old one drained; broken configs keep the running one;
systemd notifications."""

from __future__ import annotations

import signal
import socket
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from mtgworkers.config import deprecation_message
from tests.supervisor.helpers import (
    EchoStream,
    HandshakeHammer,
    open_client,
    signal_proxy,
    start_proxy,
    total_handshakes,
    wait_until,
    worker_pids,
)
from tests.support.env import KitSecret, ProxyPool
from tests.support.proxy import ProxyProcess, deep_merge, to_toml

pytestmark = pytest.mark.e2e


def _rewrite_config(proxy: ProxyProcess, changes: dict[str, Any]) -> None:
    proxy.config = deep_merge(proxy.config, changes)
    proxy.config_path.write_text(to_toml(proxy.config))


def _reached(hammers: list[HandshakeHammer], target: int) -> bool:
    return total_handshakes(hammers) >= target


def _reloads_settled(proxy: ProxyProcess, mark: int) -> bool:
    started = len(proxy.logs_matching("reloading configuration", since=mark))
    done = len(proxy.logs_matching("configuration reloaded", since=mark))
    return 1 <= started == done and len(worker_pids(proxy)) >= 2


def _reload(proxy: ProxyProcess, timeout: float = 10.0) -> dict[str, Any]:
    mark = proxy.mark()
    signal_proxy(proxy, signal.SIGHUP)
    return proxy.wait_for_log("configuration reloaded", since=mark, timeout=timeout)


def test_five_reloads_under_a_handshake_hammer(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    proxy = start_proxy(
        proxy_factory, workers=2, overrides={"supervisor": {"graceful-timeout": "20s"}}
    )
    first_generation = worker_pids(proxy)
    long_clients = [open_client(proxy, test_secret.key, test_secret.host) for _ in range(4)]
    streams = [EchoStream(client) for client in long_clients]
    for stream in streams:
        stream.start()
        stream.wait_bytes(64 * 1024, 5)
    hammers = [HandshakeHammer(proxy, test_secret.key, test_secret.host) for _ in range(2)]
    try:
        for hammer in hammers:
            hammer.start()
        wait_until(lambda: all(h.ok >= 5 for h in hammers), 10, "handshakes before the reloads")
        try:
            for round_ in range(5):
                target = total_handshakes(hammers) + 5
                record = _reload(proxy)
                assert record["generation"] == round_ + 2
                # handshakes go on across every generation switch
                wait_until(partial(_reached, hammers, target), 10, "handshakes")
            # Five more in a burst: signals that arrive while a reload is under way are
            # folded into one more reload (the kernel also merges pending signals).
            mark = proxy.mark()
            for _ in range(5):
                signal_proxy(proxy, signal.SIGHUP)
            wait_until(partial(_reloads_settled, proxy, mark), 10, "the burst of reloads")
            wait_until(partial(_reached, hammers, total_handshakes(hammers) + 5), 10, "handshakes")
        finally:
            for hammer in hammers:
                hammer.finish()
        failures = [f for h in hammers for f in h.failures]
        assert failures == [], failures[:5]
        assert sum(h.ok for h in hammers) >= 35
        # The long sessions started on generation 1 and are still relaying intact bytes.
        for stream in streams:
            stream.wait_bytes(stream.bytes + 256 * 1024, 10)
        assert len(worker_pids(proxy)) >= 3  # generation 1 drains while 6 serves
        for stream in streams:
            stream.finish()
    finally:
        for stream in streams:
            stream.stop_event.set()
        for client in long_clients:
            client.close()
    # with their sessions over, the old workers exit long before graceful-timeout (20 s)
    wait_until(lambda: len(worker_pids(proxy)) == 2, 5, "old workers to exit")
    assert not worker_pids(proxy) & first_generation
    for pid in first_generation:
        assert proxy.wait_for_log("worker exited", pid=pid)["status"] == "exit status 0"
    assert not proxy.logs_matching("worker did not exit in time; killing it")


def test_graceful_timeout_ends_old_sessions(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    proxy = start_proxy(
        proxy_factory, workers=1, overrides={"supervisor": {"graceful-timeout": "1s"}}
    )
    (old,) = worker_pids(proxy)
    client = open_client(proxy, test_secret.key, test_secret.host)
    stream = EchoStream(client)
    stream.start()
    stream.wait_bytes(32 * 1024, 5)
    _reload(proxy)
    reloaded = time.monotonic()
    stream.join(6)
    assert not stream.is_alive(), "the old session outlived graceful-timeout"
    assert stream.error is not None  # the proxy closed it under the client's feet
    cut_after = time.monotonic() - reloaded
    assert 0.5 < cut_after < 4, cut_after
    record = proxy.wait_for_log("graceful-timeout passed; closing the remaining sessions")
    assert record["sessions"] == 1 and record["timeout"] == 1.0
    proxy.wait_for_log("worker exited", pid=old)
    client.close()
    open_client(proxy, test_secret.key, test_secret.host).close()


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"supervisor": {"graceful-timeout": "-5s"}}, "supervisor.graceful-timeout: "),
        ({"network": {"timeuot": {"idle": "1m"}}}, "network.timeuot: unknown key"),
        ({"concurrency": 70000}, "concurrency: value should be 1..65535"),
        (
            {"stats": {"prometheus": {"enabled": True, "bind-to": "127.0.0.1:9"}}},
            "stats.prometheus: cannot be changed by a reload; restart the proxy",
        ),
    ],
)
def test_broken_config_is_refused_and_the_old_one_keeps_serving(
    proxy_factory: ProxyPool, test_secret: KitSecret, change: dict[str, Any], key: str
) -> None:
    proxy = start_proxy(proxy_factory, workers=2)
    pids = worker_pids(proxy)
    client = open_client(proxy, test_secret.key, test_secret.host)
    _rewrite_config(proxy, change)
    mark = proxy.mark()
    signal_proxy(proxy, signal.SIGHUP)
    error = proxy.wait_for_log("cannot reload configuration; keeping the running one", since=mark)
    assert error["level"] == "error"
    assert error["error"].startswith(key), error["error"]
    assert error["path"] == str(proxy.config_path)
    assert not proxy.logs_matching("worker started", since=mark)
    assert worker_pids(proxy) == pids
    client.send(b"still served")
    assert client.recv_exactly(12) == b"still served"
    client.close()
    open_client(proxy, test_secret.key, test_secret.host).close()


def test_reload_whose_workers_cannot_boot_keeps_the_old_generation(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    proxy = start_proxy(proxy_factory, workers=2)
    pids = worker_pids(proxy)
    # valid TOML and values, but the workers refuse to start: fronting would loop to us
    _rewrite_config(proxy, {"domain-fronting": {"port": proxy.port}})
    mark = proxy.mark()
    signal_proxy(proxy, signal.SIGHUP)
    error = proxy.wait_for_log("cannot reload configuration; keeping the running one", since=mark)
    assert "would loop" in error["error"]
    assert worker_pids(proxy) >= pids
    wait_until(lambda: worker_pids(proxy) == pids, 5, "the failed generation to go away")
    open_client(proxy, test_secret.key, test_secret.host).close()
    # a fixed config reloads fine afterwards
    _rewrite_config(proxy, {"domain-fronting": {"port": proxy_factory.fronting_port}})
    assert _reload(proxy)["generation"] == 3


def test_reload_changes_the_number_of_workers(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    proxy = start_proxy(proxy_factory, workers=2)
    _rewrite_config(proxy, {"supervisor": {"workers": 3}})
    assert _reload(proxy)["workers"] == 3
    wait_until(lambda: len(worker_pids(proxy)) == 3, 5, "three workers")
    _rewrite_config(proxy, {"supervisor": {"workers": 1}})
    assert _reload(proxy)["workers"] == 1
    wait_until(lambda: len(worker_pids(proxy)) == 1, 5, "one worker")
    for _ in range(4):
        open_client(proxy, test_secret.key, test_secret.host).close()


def test_reload_warns_about_deprecated_keys(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    proxy = start_proxy(proxy_factory, workers=1)
    # the old spelling of a key the config already sets: only the warning changes
    _rewrite_config(proxy, {"domain-fronting-port": proxy_factory.fronting_port})
    mark = proxy.mark()
    _reload(proxy)
    (warning,) = proxy.logs_matching("deprecated option in the reloaded configuration", since=mark)
    assert warning["level"] == "warn"
    assert warning["option"] == "domain-fronting-port"
    assert warning["advice"] == deprecation_message("domain-fronting-port")
    open_client(proxy, test_secret.key, test_secret.host).close()


def test_systemd_notifications(
    proxy_factory: ProxyPool,
    test_secret: KitSecret,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        listener.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", path)

        def receive(expected: str) -> list[str]:
            seen = []
            while True:
                lines = listener.recv(4096).decode().split("\n")
                seen.append(lines)
                if expected in lines:
                    return lines

        proxy = start_proxy(proxy_factory, workers=2)
        ready = receive("READY=1")
        assert any(line.startswith("STATUS=generation 1: 2 workers") for line in ready)
        signal_proxy(proxy, signal.SIGHUP)
        reloading = receive("RELOADING=1")
        usec = [line for line in reloading if line.startswith("MONOTONIC_USEC=")]
        assert usec and abs(int(usec[0].split("=")[1]) / 1e6 - time.monotonic()) < 10
        assert "READY=1" in receive("READY=1")
        proxy.stop()
        stopping = receive("STOPPING=1")
        assert "STOPPING=1" in stopping


def test_reload_with_an_unwritable_pid_file_is_refused(
    proxy_factory: ProxyPool, test_secret: KitSecret, tmp_path: Path
) -> None:
    pid_file = tmp_path / "run" / "mtgworkers.pid"
    pid_file.parent.mkdir()
    proxy = start_proxy(
        proxy_factory, workers=2, overrides={"supervisor": {"pid-file": str(pid_file)}}
    )
    assert pid_file.read_text() == f"{proxy.pid}\n"
    pids = worker_pids(proxy)
    client = open_client(proxy, test_secret.key, test_secret.host)

    # a directory that does not exist: fatal at start, so a reload refuses it
    missing = tmp_path / "missing" / "mtgworkers.pid"
    _rewrite_config(proxy, {"supervisor": {"pid-file": str(missing)}})
    mark = proxy.mark()
    signal_proxy(proxy, signal.SIGHUP)
    error = proxy.wait_for_log("cannot reload configuration; keeping the running one", since=mark)
    assert error["level"] == "error"
    assert error["error"] == (
        f"supervisor.pid-file: cannot write pid-file {missing}: No such file or directory"
    )
    assert not proxy.logs_matching("reloading configuration", since=mark)
    assert not proxy.logs_matching("worker started", since=mark)
    assert worker_pids(proxy) == pids
    assert pid_file.read_text() == f"{proxy.pid}\n"
    client.send(b"still served")
    assert client.recv_exactly(12) == b"still served"
    client.close()

    # a writable pid file whose generation cannot boot: the new file is taken back
    moved = tmp_path / "elsewhere" / "mtgworkers.pid"
    moved.parent.mkdir()
    _rewrite_config(
        proxy, {"supervisor": {"pid-file": str(moved)}, "domain-fronting": {"port": proxy.port}}
    )
    mark = proxy.mark()
    signal_proxy(proxy, signal.SIGHUP)
    error = proxy.wait_for_log("cannot reload configuration; keeping the running one", since=mark)
    assert "would loop" in error["error"]
    assert not moved.exists()
    assert pid_file.read_text() == f"{proxy.pid}\n"
    wait_until(lambda: worker_pids(proxy) == pids, 5, "the failed generation to go away")

    # a good reload moves the pid file
    _rewrite_config(proxy, {"domain-fronting": {"port": proxy_factory.fronting_port}})
    _reload(proxy)
    assert moved.read_text() == f"{proxy.pid}\n"
    assert not pid_file.exists()
    open_client(proxy, test_secret.key, test_secret.host).close()
    proxy.stop()
    assert not moved.exists()
