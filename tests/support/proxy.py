"""Run the proxy (``python -m mtgworkers run CONFIG``) as a subprocess for e2e tests.

:func:`make_config` builds the config dictionary (TOML key spelling) and
:class:`ProxyProcess` writes it to a file, starts the proxy, collects its JSON log
lines from stdout on a thread and offers helpers around them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]
LogRecord = dict[str, Any]


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# -- TOML ---------------------------------------------------------------------------------
def _toml_key(key: str | int) -> str:
    text = str(key)
    if text and all(c.isalnum() or c in "-_" for c in text):
        return text
    return json.dumps(text)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(data: Mapping[str, Any]) -> str:
    """Serialise nested dicts of str/int/float/bool/lists to TOML (tables after values)."""
    lines: list[str] = []

    def emit(table: Mapping[str, Any], path: list[str]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
        tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
        if path and (scalars or not tables):
            lines.append(f"[{'.'.join(path)}]")
        for key, value in scalars.items():
            if value is None:
                continue
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        if scalars:
            lines.append("")
        for key, value in tables.items():
            emit(value, [*path, _toml_key(key)])

    emit(data, [])
    return "\n".join(lines) + "\n"


def deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return base updated recursively with overrides (a None value deletes the key)."""
    result = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(result.get(key), dict):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def make_config(
    secret_hex: str,
    *,
    bind_port: int,
    dc_port: int | None,
    fronting_port: int | None,
    dcs: tuple[int, ...] = (1, 2, 3, 4, 5),
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Config dict for a test proxy on 127.0.0.1:bind_port.

    DCs in ``dcs`` are overridden to the fake DC at 127.0.0.1:dc_port, fronting goes to
    127.0.0.1:fronting_port, public IPs are pinned (no ifconfig.co look-ups), debug logs.
    """
    config: dict[str, Any] = {
        "secret": secret_hex,
        "bind-to": f"127.0.0.1:{bind_port}",
        "debug": True,
        # Pinned so the start-up SNI check never asks the internet for our address.
        "public-ipv4": "127.0.0.1",
        "public-ipv6": "::1",
        # Name look-ups (the start-up SNI-DNS check) go to a closed loopback port, never to
        # the host's resolver.
        "network": {"dns": "udp://127.0.0.1:9", "timeout": {"tcp": "2s", "handshake": "5s"}},
        # SIGTERM drains sessions for up to graceful-timeout: keep teardowns short.
        "supervisor": {"graceful-timeout": "1s"},
    }
    if fronting_port is not None:
        config["domain-fronting"] = {"ip": "127.0.0.1", "port": fronting_port}
    if dc_port is not None:
        config["dc-overrides"] = {str(dc): [f"127.0.0.1:{dc_port}"] for dc in dcs}
    return deep_merge(config, overrides or {})


# -- process ------------------------------------------------------------------------------
def _listening(port: int) -> bool:
    """True if some socket is in LISTEN state on ``port`` (reads /proc, opens no socket)."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except FileNotFoundError:
            continue
    return False


def _nofile_limiter(limit: int) -> Callable[[], None]:
    def limit_nofile() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return limit_nofile


class ProxyProcess:
    """One proxy subprocess with its config, log lines and resource probes."""

    def __init__(self, config: Mapping[str, Any], workdir: Path) -> None:
        self.config = dict(config)
        self.workdir = Path(workdir)
        self.config_path = self.workdir / "mtgworkers.toml"
        host, _, port = str(config["bind-to"]).rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[LogRecord] = []
        self.stderr = bytearray()
        self._cond = threading.Condition()
        self._readers: list[threading.Thread] = []

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def pid(self) -> int:
        assert self.proc is not None, "proxy not started"
        return self.proc.pid

    # -- lifecycle ----------------------------------------------------------------------
    def start(
        self,
        timeout: float = 15.0,
        *,
        nofile: int | None = None,
        env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
    ) -> ProxyProcess:
        """Write the config, start the proxy and wait (bounded) until it listens.

        ``nofile`` sets the proxy's RLIMIT_NOFILE, soft and hard (so that it cannot raise
        it); ``env`` adds environment variables; ``wrapper`` is a command that runs the
        proxy's command line (its arguments follow). Raises RuntimeError with the proxy's
        output if it exits or does not listen.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(to_toml(self.config))
        environment = {**os.environ, **(env or {})}
        environment["PYTHONUNBUFFERED"] = "1"
        environment["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), environment.get("PYTHONPATH", "")) if p
        )
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "mtgworkers", "run", str(self.config_path)],
            cwd=self.workdir,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=None if nofile is None else _nofile_limiter(nofile),
        )
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True, name="proxy-stdout"),
            threading.Thread(target=self._read_stderr, daemon=True, name="proxy-stderr"),
        ]
        for thread in self._readers:
            thread.start()
        deadline = time.monotonic() + timeout
        while not _listening(self.port):
            if self.proc.poll() is not None:
                self._join_readers()
                raise RuntimeError(
                    f"proxy exited with {self.proc.returncode} before listening\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"proxy did not listen within {timeout} s\n{self.output()}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0, *, check: bool = True) -> int | None:
        """SIGTERM, wait; with ``check`` assert a 0 exit code. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"proxy did not exit within {timeout} s of SIGTERM\n{self.output()}"
                ) from None
        self._join_readers()
        code = self.proc.returncode
        if check and code != 0:
            raise AssertionError(f"proxy exited with {code} after SIGTERM\n{self.output()}")
        return code

    def kill(self) -> None:
        """SIGKILL the proxy and its children (cleanup path only)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
        self.proc.kill()
        self.proc.wait(5)
        self._join_readers()

    def _join_readers(self) -> None:
        for thread in self._readers:
            thread.join(5)

    # -- logs ---------------------------------------------------------------------------
    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError
            except ValueError:
                record = {"message": line, "_raw": True}
            with self._cond:
                self.logs.append(record)
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.stderr += raw

    def output(self, tail: int = 60) -> str:
        """Last log lines and stderr, for failure messages."""
        with self._cond:
            lines = [json.dumps(r) for r in self.logs[-tail:]]
            err = self.stderr.decode(errors="replace")[-8000:]
        return "--- stdout (JSON logs) ---\n" + "\n".join(lines) + "\n--- stderr ---\n" + err

    def mark(self) -> int:
        """Number of log records so far; pass it as ``since`` to look only at newer ones."""
        with self._cond:
            return len(self.logs)

    def logs_matching(
        self,
        message: str,
        predicate: Callable[[LogRecord], bool] | None = None,
        *,
        since: int = 0,
        **fields: Any,
    ) -> list[LogRecord]:
        """Records (from index ``since``) with this message, equal ``fields``, ``predicate``."""
        with self._cond:
            records = self.logs[since:]
        return [
            r
            for r in records
            if r.get("message") == message
            and all(r.get(k) == v for k, v in fields.items())
            and (predicate is None or predicate(r))
        ]

    def wait_for_log(
        self,
        message: str,
        timeout: float = 5.0,
        *,
        count: int = 1,
        predicate: Callable[[LogRecord], bool] | None = None,
        since: int = 0,
        **fields: Any,
    ) -> LogRecord:
        """Wait until ``count`` matching records exist; return the last. AssertionError else.

        ``since`` (from :meth:`mark`) ignores older records.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self.logs_matching(message, predicate, since=since, **fields)
                if len(found) >= count:
                    return found[count - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.2))
        raise AssertionError(
            f"log {message!r} {fields or ''} not seen {count}x within {timeout} s\n" + self.output()
        )

    def records(self, since: int = 0) -> list[LogRecord]:
        """A copy of the log records from index ``since``."""
        with self._cond:
            return self.logs[since:]

    def wait_for_records(
        self,
        done: Callable[[list[LogRecord]], bool],
        what: str,
        *,
        since: int = 0,
        timeout: float = 5.0,
    ) -> list[LogRecord]:
        """Wait until ``done(records since)`` is true; return those records.

        AssertionError naming ``what`` (with the proxy's output) after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                records = self.logs[since:]
                if done(records):
                    return records
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.2))
        raise AssertionError(f"{what} not seen within {timeout} s\n" + self.output())

    # -- resources ----------------------------------------------------------------------
    def _processes(self) -> list[psutil.Process]:
        main = psutil.Process(self.pid)
        return [main, *main.children(recursive=True)]

    def fd_count(self) -> int:
        """Open file descriptors of the proxy and its children (/proc/PID/fd)."""
        total = 0
        for proc in self._processes():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += len(os.listdir(f"/proc/{proc.pid}/fd"))
        return total

    def rss(self) -> int:
        """Resident memory in bytes of the proxy and its children."""
        total = 0
        for proc in self._processes():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def wait_fd_count(self, target: int, timeout: float = 5.0, slack: int = 0) -> int:
        """Wait until fd_count() <= target + slack; return the last count (AssertionError)."""
        deadline = time.monotonic() + timeout
        while True:
            count = self.fd_count()
            if count <= target + slack:
                return count
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"proxy fd count {count} did not return to {target} (+{slack}) "
                    f"within {timeout} s"
                )
            time.sleep(0.05)

    def assert_alive(self) -> None:
        """AssertionError (with the proxy's output) if the process has exited."""
        assert self.proc is not None, "proxy not started"
        code = self.proc.poll()
        if code is not None:
            self._join_readers()
            raise AssertionError(f"proxy died with exit code {code}\n{self.output()}")


class RssSampler:
    """Samples a proxy's RSS on a thread while a ``with`` block runs; keeps the maximum."""

    def __init__(self, proxy: ProxyProcess, interval: float = 0.05) -> None:
        self.proxy = proxy
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def growth(self) -> int:
        """Peak minus baseline, in bytes."""
        return self.peak - self.baseline

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(psutil.Error, FileNotFoundError):
                self.peak = max(self.peak, self.proxy.rss())

    def __enter__(self) -> RssSampler:
        self.baseline = self.peak = self.proxy.rss()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.peak = max(self.peak, self.proxy.rss())
