"""The exporter's HTTP server: every scrape is answered from a fresh :class:`Scraper` run.

Go ``ServeMux`` semantics for ``http-path``: ``/`` answers every path, any other path
only itself; GET and HEAD; gzip when asked; OpenMetrics when the ``Accept`` header asks
for it. Every request runs in its own thread with a socket timeout, and at most
:data:`MAX_CONCURRENT_SCRAPES` are served at once (a 503 beyond that).

:func:`run_exporter` is the body of the exporter process (and of tests serving from a
thread): it serves on an address or an already bound socket until it is stopped, a
SIGTERM/SIGQUIT arrives or the supervisor that started it is gone.
"""

from __future__ import annotations

import gzip
import logging
import os
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import urlsplit

from mtgworkers.config import HostPort
from supervisor.exporter.exposition import Scraper
from supervisor.exporter.pool import PoolStatsSource
from supervisor.signals import IGNORED_SIGNALS, STOP_SIGNALS

__all__ = [
    "MAX_CONCURRENT_SCRAPES",
    "ExporterError",
    "listen",
    "path_matches",
    "run_exporter",
]

_log = logging.getLogger("mtgworkers.exporter")

MAX_CONCURRENT_SCRAPES: Final = 16
REQUEST_TIMEOUT: Final = 10.0
PARENT_CHECK_EVERY: Final = 1.0


class ExporterError(Exception):
    """The exporter cannot start; the message names the address or the problem."""


def path_matches(pattern: str, path: str) -> bool:
    """Go ServeMux matching for one pattern: ``/`` matches every path, a pattern ending
    in ``/`` its whole subtree, any other pattern only itself."""
    if pattern.endswith("/"):
        return path.startswith(pattern)
    return path == pattern


class _MetricsServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, sock: socket.socket, scraper: Scraper, http_path: str) -> None:
        self.address_family = sock.family
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()  # the unbound one made by the constructor
        self.socket = sock
        self.server_address = sock.getsockname()
        sock.setblocking(True)
        sock.listen(128)  # no-op when already listening; makes a bound-only socket usable
        self.scraper = scraper
        self.http_path = http_path
        self.slots = threading.BoundedSemaphore(MAX_CONCURRENT_SCRAPES)


class _Handler(BaseHTTPRequestHandler):
    server: _MetricsServer
    timeout = REQUEST_TIMEOUT
    server_version = "mtgworkers-exporter"
    sys_version = ""

    def do_GET(self) -> None:
        self._serve(with_body=True)

    def do_HEAD(self) -> None:
        self._serve(with_body=False)

    def _serve(self, with_body: bool) -> None:
        server = self.server
        if not path_matches(server.http_path, urlsplit(self.path).path or "/"):
            self._reply(404, b"404 page not found\n", "text/plain; charset=utf-8", with_body)
            return
        if not server.slots.acquire(blocking=False):
            self._reply(503, b"too many concurrent scrapes\n", "text/plain", with_body)
            return
        try:
            accept = self.headers.get("Accept", "")
            body, content_type = server.scraper.scrape("application/openmetrics-text" in accept)
        except Exception as exc:
            _log.error("scrape failed", extra={"error": repr(exc)}, exc_info=exc)
            self._reply(500, b"scrape failed\n", "text/plain", with_body)
            return
        finally:
            server.slots.release()
        encoding = None
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            body, encoding = gzip.compress(body, compresslevel=1), "gzip"
        self._reply(200, body, content_type, with_body, encoding)

    def _reply(
        self,
        status: int,
        body: bytes,
        content_type: str,
        with_body: bool,
        encoding: str | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "metrics request",
                extra={"client": self.client_address[0], "request": format % args},
            )


def run_exporter(
    bind_to: HostPort | tuple[str, int] | socket.socket,
    http_path: str,
    metric_prefix: str,
    multiproc_dir: str,
    pool_stats_source: PoolStatsSource | None = None,
    *,
    stop: threading.Event | None = None,
    parent_pid: int | None = None,
) -> None:
    """Serve the metrics until ``stop`` is set, SIGTERM or SIGQUIT arrives (SIGINT too
    without ``parent_pid``; signals only when called in the main thread), or the process
    ``parent_pid`` is no longer our parent.

    ``bind_to`` is an address to listen on or an already bound socket (the supervisor's);
    ``http_path`` is the normalised ``[stats.prometheus] http-path``; ``multiproc_dir``
    is where the workers write; ``pool_stats_source`` gives the supervisor's pool
    statistics (None: no pool metrics). Raises :class:`ExporterError` when the address
    cannot be bound.
    """
    sock = bind_to if isinstance(bind_to, socket.socket) else listen(_host_port(bind_to))
    scraper = Scraper(multiproc_dir, metric_prefix, pool_stats_source)
    server = _MetricsServer(sock, scraper, http_path)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        stopping = list(STOP_SIGNALS)
        if parent_pid is None:
            stopping.append(signal.SIGINT)
        else:
            # Under a supervisor: a terminal's Ctrl-C, hang-up or job control signals go to
            # the whole process group, but they are the supervisor's to handle (it stops
            # us with SIGTERM when it is done), like its workers.
            for signum in IGNORED_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
        for signum in stopping:
            signal.signal(signum, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, args=(0.5,), name="http", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    _log.info(
        "metrics exporter is serving",
        extra={"bind_to": str(HostPort(str(host), int(port))), "http_path": http_path},
    )
    try:
        while not stop.wait(PARENT_CHECK_EVERY):
            if parent_pid is not None and os.getppid() != parent_pid:
                _log.warning("the supervisor is gone; metrics exporter stops")
                break
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _host_port(bind_to: HostPort | tuple[str, int]) -> HostPort:
    if isinstance(bind_to, HostPort):
        return bind_to
    return HostPort(bind_to[0], bind_to[1])


def listen(address: HostPort) -> socket.socket:
    """A listening TCP socket on ``address``; :class:`ExporterError` naming it."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(
                socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if address.host == "::" else 1
            )
        sock.bind((address.host, address.port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ExporterError(
            f"cannot listen on {address} for prometheus: {exc.strerror or exc}"
        ) from exc
    return sock
