"""Upgrade by reload: after the installed code changed, SIGHUP starts the next generation
on the new code while the old generation keeps its sessions.

The proxy runs from a copy of ``mtgworkers/`` and ``supervisor/`` in a temporary
directory (the "installation"); the upgrade rewrites ``__version__`` in that copy. A
worker forked from the supervisor's already imported modules, instead of exec'd as a
fresh interpreter, would report the version the supervisor started with.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import psutil
import pytest

from mtgworkers import __version__ as CHECKOUT_VERSION
from tests.supervisor.helpers import (
    open_client,
    owner_of,
    ready_workers,
    signal_proxy,
    wait_until,
    worker_pids,
)
from tests.support.client import FakeTLSClient
from tests.support.env import KitSecret, ProxyPool
from tests.support.proxy import REPO_ROOT

pytestmark = pytest.mark.e2e

SESSIONS = 6
NEW_VERSION = CHECKOUT_VERSION + "+upgraded"
VERSION_LINE = re.compile(r'^__version__ = "[^"]*"$', re.MULTILINE)


def _install(target: Path) -> Path:
    """Copy the packages the proxy runs from into ``target``; return ``target``."""
    for package in ("mtgworkers", "supervisor"):
        shutil.copytree(
            REPO_ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return target


def _upgrade(root: Path, version: str) -> None:
    """What ``pip install -U`` does to the installation, as far as this test looks."""
    init = root / "mtgworkers" / "__init__.py"
    text, count = VERSION_LINE.subn(f'__version__ = "{version}"', init.read_text())
    assert count == 1, f"no __version__ line in {init}"
    init.write_text(text)


def _code_root(pid: int) -> str:
    """The package root a worker's bootstrap put on sys.path (its command line)."""
    argv = psutil.Process(pid).cmdline()
    assert "-c" in argv, f"worker {pid} is not a fresh interpreter: {argv}"
    return argv[argv.index("-c") + 2]


def _echo(client: FakeTLSClient, payload: bytes) -> bytes:
    client.send(payload)
    return client.recv_exactly(len(payload))


def test_reload_after_an_upgrade_runs_the_new_code_and_keeps_every_session(
    proxy_factory: ProxyPool, test_secret: KitSecret, tmp_path: Path
) -> None:
    root = _install(tmp_path / "install")
    proxy = proxy_factory({"supervisor": {"workers": 2, "graceful-timeout": "60s"}}, start=False)
    proxy.start(code_root=root)
    proxy.wait_for_log("proxy is listening", timeout=10)
    proxy.wait_for_log("worker is ready", count=2, generation=1)
    old_ready = proxy.logs_matching("worker is ready", generation=1)
    assert len(old_ready) == 2
    assert {r["version"] for r in old_ready} == {CHECKOUT_VERSION}
    old_pids = set(ready_workers(proxy))
    assert old_pids == worker_pids(proxy)
    # the workers run the copy, not this checkout
    assert {_code_root(pid) for pid in old_pids} == {str(root)}
    supervisor = proxy.logs_matching("supervisor started")[0]
    assert supervisor["version"] == CHECKOUT_VERSION

    clients: list[FakeTLSClient] = []
    try:
        for _ in range(SESSIONS):
            clients.append(open_client(proxy, test_secret.key, test_secret.host))
        owners = {owner_of(proxy, client) for client in clients}
        assert owners <= old_pids

        _upgrade(root, NEW_VERSION)
        mark = proxy.mark()
        signal_proxy(proxy, signal.SIGHUP)
        reloaded = proxy.wait_for_log("configuration reloaded", since=mark, timeout=20)
        assert reloaded["generation"] == 2
        assert reloaded["versions"] == [NEW_VERSION]
        new_ready = proxy.logs_matching("worker is ready", since=mark, generation=2)
        assert len(new_ready) == 2
        assert {r["version"] for r in new_ready} == {NEW_VERSION}
        new_pids = {r["pid"] for r in new_ready}
        assert not new_pids & old_pids
        assert {_code_root(pid) for pid in new_pids} == {str(root)}

        mark = proxy.mark()
        signal_proxy(proxy, signal.SIGUSR2)
        status = proxy.wait_for_log("worker status", since=mark)
        # the supervisor itself keeps the code it started with
        assert status["version"] == CHECKOUT_VERSION
        assert status["generation"] == 2
        by_pid = {w["pid"]: w for w in status["workers"]}
        for pid in new_pids:
            assert by_pid[pid]["generation"] == 2
            assert by_pid[pid]["state"] == "ready"
            assert by_pid[pid]["version"] == NEW_VERSION
        for pid in owners:  # old workers that hold sessions drain them
            assert by_pid[pid]["generation"] == 1
            assert by_pid[pid]["state"] == "retiring"
            assert by_pid[pid]["version"] == CHECKOUT_VERSION
        assert sum(w["sessions"] for w in status["workers"] if w["pid"] in old_pids) == SESSIONS

        # every old session still relays both ways, on the worker that accepted it
        for client in clients:
            payload = os.urandom(48 * 1024)
            assert _echo(client, payload) == payload
            assert owner_of(proxy, client) in owners
        # a new session lands on the new generation
        fresh = open_client(proxy, test_secret.key, test_secret.host)
        clients.append(fresh)
        assert owner_of(proxy, fresh) in new_pids
    finally:
        for client in clients:
            client.close()
    # drained, the old generation exits without waiting for the graceful timeout
    wait_until(lambda: not worker_pids(proxy) & old_pids, 10, "the old generation to exit")
    assert worker_pids(proxy) == new_pids
    proxy.assert_alive()
    assert proxy.stop() == 0
