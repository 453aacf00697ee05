"""The systemd unit's seccomp policy costs the proxy nothing.

``deploy/mtgworkers.service`` sets ``MemoryDenyWriteExecute=yes`` and
``SystemCallFilter=@system-service`` (with ``SystemCallErrorNumber=EPERM``). Where
systemd is not PID 1 (containers, CI) ``systemd-run -p ...`` cannot apply them, so
:mod:`tests.support.sandbox` loads the same filters with libseccomp, and a 2-worker proxy
runs under them: relayed sessions, fronting, anti-replay, the exporter (its netlink
accept-queue figures included), a reload and a clean stop.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys

import psutil
import pytest

from tests.stats.helpers import scrape_series, value, wait_until
from tests.support.client import FakeTLSClient
from tests.support.env import ProxyPool
from tests.support.proxy import free_port

pytestmark = pytest.mark.e2e


@functools.cache
def system_service_calls() -> tuple[str, ...]:
    """The system calls of ``@system-service``, nested groups expanded."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package: systemd)")
    names: set[str] = set()
    pending, seen = ["@system-service"], set()
    while pending:
        group = pending.pop()
        seen.add(group)
        output = subprocess.run(
            [analyze, "syscall-filter", group], capture_output=True, text=True, check=True
        ).stdout
        for line in output.splitlines()[1:]:
            word = line.strip()
            if not word or word.startswith("#"):
                continue
            if word.startswith("@"):
                if word not in seen:
                    pending.append(word)
            else:
                names.add(word)
    assert {"read", "socket", "setrlimit", "execve"} <= names
    return tuple(sorted(names))


def _sandbox(*options: str) -> list[str]:
    try:
        import ctypes.util

        if ctypes.util.find_library("seccomp") is None:
            pytest.skip("libseccomp not installed (Debian package: libseccomp2)")
    except ImportError:
        pytest.skip("no ctypes")
    return [sys.executable, "-m", "tests.support.sandbox", *options, "--"]


def _run(wrapper: list[str], code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*wrapper, sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )


def test_the_filters_bite() -> None:
    # A writable and executable mapping is refused...
    wx = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)"
    assert _run([], wx).returncode == 0
    refused = _run(_sandbox("--mdwe"), wx)
    assert refused.returncode != 0 and "Operation not permitted" in refused.stderr
    # ... and so is a call outside the allowed set.
    without_socket = ",".join(n for n in system_service_calls() if n != "socket")
    opened = "import socket; socket.socket()"
    assert _run(_sandbox("--syscalls", ",".join(system_service_calls())), opened).returncode == 0
    refused = _run(_sandbox("--syscalls", without_socket), opened)
    assert refused.returncode != 0 and "Operation not permitted" in refused.stderr


def test_the_proxy_runs_under_the_units_seccomp_policy(proxy_factory: ProxyPool) -> None:
    port = free_port()
    proxy = proxy_factory(
        {
            "debug": False,
            "supervisor": {"workers": 2},
            "defense": {"anti-replay": {"enabled": True}},
            "stats": {"prometheus": {"enabled": True, "bind-to": f"127.0.0.1:{port}"}},
        },
        start=False,
    )
    proxy.start(wrapper=_sandbox("--mdwe", "--syscalls", ",".join(system_service_calls())))
    wait_until(
        lambda: value(scrape_series(port), "mtg_workers", state="ready") == 2, 15, "2 workers"
    )
    # The supervisor, both workers and the exporter all run under both filters.
    processes = [proxy.pid] + [c.pid for c in psutil.Process(proxy.pid).children(recursive=True)]
    assert len(processes) >= 4
    for pid in processes:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        assert fields["Seccomp"].strip() == "2", pid
        assert int(fields["Seccomp_filters"]) >= 2, pid
    key = proxy_factory.secret.key
    host = proxy_factory.secret.host
    for _ in range(4):  # both workers serve (the kernel spreads the connections)
        with FakeTLSClient(proxy.host, proxy.port, key, host) as client:
            client.handshake(dc=2)
            data = os.urandom(65536)
            client.send(data)
            assert client.recv_exactly(len(data)) == data
    with FakeTLSClient(proxy.host, proxy.port, os.urandom(16), host) as probe:
        probe.send_client_hello()
        series = wait_until(
            lambda: (s := scrape_series(port)) and value(s, "mtg_domain_fronting_total") == 1 and s,
            10,
            "the fronted probe",
        )
    # The exporter reads the accept queues over netlink (the backlog is only served so).
    assert value(series, "mtg_listen_queue_backlog", slot="0") > 0
    # A reload starts a new generation of workers under the same filters.
    mark = proxy.mark()
    os.kill(proxy.pid, signal.SIGHUP)
    wait_until(
        lambda: value(scrape_series(port), "mtg_reloads_total", result="success") == 1,
        20,
        "the reload",
    )
    with FakeTLSClient(proxy.host, proxy.port, key, host) as client:
        client.handshake(dc=2)
        client.send(b"after the reload")
        assert client.recv_exactly(16) == b"after the reload"
    assert not proxy.logs_matching("Operation not permitted", since=mark)
    proxy.assert_alive()
    # The pool's teardown stops it with SIGTERM and asserts exit status 0.
