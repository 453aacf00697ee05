"""Helpers for the stats tests: worker processes without a supervisor, scrapes, parsing."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.proxy import REPO_ROOT, deep_merge, free_port, make_config, to_toml

Series = dict[str, dict[tuple[tuple[str, str], ...], float]]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; return it (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def listening(port: int) -> bool:
    """True when a socket listens on TCP ``port`` (reads /proc: connecting would count as
    a client in the metrics under test)."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(name) as table:
            next(table)
            for line in table:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


class WorkerProcess:
    """``python -m tests.stats.runner CONFIG SLOT`` as a subprocess."""

    def __init__(
        self,
        workdir: Path,
        config: Mapping[str, Any],
        slot: int | str,
        multiproc_dir: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.config = dict(config)
        self.slot = str(slot)
        self.multiproc_dir = multiproc_dir
        host, _, port = str(config["bind-to"]).rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"worker-{self.slot}-{self.port}.log"

    def start(self) -> WorkerProcess:
        """Start it (does not wait; see :meth:`wait_listening`)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / f"worker-{self.slot}-{self.port}.toml"
        config_path.write_text(to_toml(self.config))
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if self.multiproc_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = self.multiproc_dir
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.stats.runner", str(config_path), self.slot],
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_listening(self, timeout: float = 8.0) -> WorkerProcess:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not listening(self.port):
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker did not listen in {timeout} s\n{self.output()}")
            time.sleep(0.02)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-6000:]
        return ""

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)

    def stop(self, timeout: float = 8.0) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it was never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"worker ignored SIGTERM\n{self.output()}") from None
        return self.proc.returncode


def worker_config(
    secret_hex: str, dc_port: int, fronting_port: int, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A worker config on a free loopback port, DCs at the fake DC, Prometheus on."""
    base: dict[str, Any] = {
        "debug": False,
        "stats": {"prometheus": {"enabled": True, "bind-to": "127.0.0.1:9"}},
    }
    config = make_config(
        secret_hex,
        bind_port=free_port(),
        dc_port=dc_port,
        fronting_port=fronting_port,
        overrides=base,
    )
    return deep_merge(config, overrides or {})


def scrape(
    port: int,
    path: str = "/",
    *,
    host: str = "127.0.0.1",
    headers: Mapping[str, str] | None = None,
    method: str = "GET",
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request to the exporter: (status, lower-cased headers, body, gunzipped)."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, headers=dict(headers or {}))
        response = conn.getresponse()
        body = response.read()
        head = {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()
    if head.get("content-encoding") == "gzip":
        body = gzip.decompress(body)
    return response.status, head, body


def parse(text: str) -> Series:
    """{sample name: {sorted label pairs: value}} of a classic text exposition, parsed by
    prometheus_client.parser (which rejects malformed input)."""
    series: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            by_labels = series.setdefault(sample.name, {})
            assert labels not in by_labels, f"duplicate series {sample.name}{labels}"
            by_labels[labels] = sample.value
    return series


def value(series: Series, name: str, **labels: str) -> float:
    """The value of one series (0.0 when absent)."""
    return series.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def total(series: Series, name: str) -> float:
    """The sum over every series of ``name``."""
    return sum(series.get(name, {}).values())


def scrape_series(port: int, path: str = "/") -> Series:
    status, _, body = scrape(port, path)
    assert status == 200, body
    return parse(body.decode())
