"""The metrics exporter: a separate process serving the workers' metrics over HTTP.

Workers write their values into prometheus-client multiprocess files (see
:mod:`mtgworkers.stats.prometheus`); this process reads and sums them for every scrape
and serves the result on ``[stats.prometheus] bind-to`` + ``http-path``. Workers never
wait for it: a slow, hung or crashed exporter costs scrapes, never connections.

Who does what:

- :class:`Exporter` is the supervisor's handle (``serve()`` uses it too). It creates the
  private metrics directory (mode 0700, removed by :meth:`Exporter.close`) and sets
  ``PROMETHEUS_MULTIPROC_DIR`` for the workers forked later, binds the listening socket
  itself (a bind error is a start-up error, as in mtg, and the socket, with its queue,
  survives exporter restarts), and runs the exporter as a fresh interpreter
  (``python -m supervisor.exporter``), not a fork: the process facing HTTP holds none
  of the supervisor's memory (no secret), sockets or signal handlers. The supervisor
  calls :meth:`Exporter.poll` from its loop; a dead exporter is restarted with a
  back-off.
- :class:`PoolCounters` is a small shared memory segment (layout below) where the
  supervisor counts worker restarts and reloads; with the scoreboard (worker records and
  psutil samples, ``supervisor/shm.py``) it is the exporter's *pool stats source*.
- :func:`run_exporter` is the exporter process's body: HTTP server threads, one
  :class:`Scraper`.

Exposition. mtg's ten metrics keep mtg's names, types, labels and help texts, under
``<metric-prefix>_``. In the classic text format (``text/plain; version=0.0.4``, what a
scraper gets unless it asks for OpenMetrics) mtg's counters have no ``_total`` suffix
(``mtg_domain_fronting 3``) while the Prometheus convention, and OpenMetrics, want it.
Both names are served: ``<name>_total`` as the counter, and mtg's bare ``<name>`` with
the same value and help as a compatibility copy, typed ``untyped`` so that the exposition
passes ``promtool check metrics`` (its linter rejects a counter without ``_total``,
which mtg's own output fails). Existing queries such as ``rate(mtg_domain_fronting[5m])``
keep working; new ones should use ``mtg_domain_fronting_total``. A scraper that asks for
OpenMetrics (Prometheus does by default) gets exactly what mtg serves then: counter
families whose samples end in ``_total``. Labels are printed sorted by name and numbers
the way Go prints them (``200``, ``1.5e+06``), families sorted by name, like mtg.

Pool metrics (same prefix; not in mtg): ``workers{state}``, ``worker_sessions``,
``worker_resident_memory_bytes``, ``worker_cpu_seconds_total``, ``worker_open_fds`` (per
worker, labels ``slot`` and ``pid``), ``worker_restarts_total{reason}``,
``reloads_total{result}`` and ``supervisor_start_time_seconds``.

HTTP: Go ``ServeMux`` semantics for ``http-path``: ``/`` answers every path, any other
path only itself; GET and HEAD; gzip when asked. Every request runs in its own thread
with a socket timeout, and at most :data:`MAX_CONCURRENT_SCRAPES` are served at once.

:class:`PoolCounters` layout (little-endian; written only by the supervisor, 8-byte
aligned single stores, so a reader never sees a torn value)::

    offset  size  field
         0     8  magic b"MTGWPOOL"
         8     4  u32 layout version (2)
        12     4  reserved, 0
        16     8  f64 supervisor start time (Unix time)
        24    32  u64 worker restarts by reason: exit, signal, max_rss, timeout
        56    16  u64 reloads by result: success, failure
        72        (end)
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from mtgworkers.config import HostPort
from mtgworkers.stats.prometheus import (
    MTG_METRICS,
    MULTIPROC_ENV,
    create_multiproc_dir,
    reap_dead_workers,
    remove_multiproc_dir,
)
from supervisor.signals import IGNORED_SIGNALS, STOP_SIGNALS
from supervisor.states import WORKER_STATES, WorkerState

if TYPE_CHECKING:
    from mtgworkers.config import Prometheus
    from supervisor.shm import Scoreboard, Segment

__all__ = [
    "DEFAULT_BIND",
    "RELOAD_RESULTS",
    "RESTART_REASONS",
    "Exporter",
    "ExporterError",
    "PoolCounters",
    "PoolSnapshot",
    "PoolStatsSource",
    "Scraper",
    "SharedPoolStats",
    "WorkerStats",
    "go_float",
    "main",
    "run_exporter",
]

_log = logging.getLogger("mtgworkers.exporter")

# [stats.prometheus] bind-to unset: mtg listens on a random port on every interface;
# we stay on loopback, on the port of mtg's example config.
DEFAULT_BIND: Final = HostPort("127.0.0.1", 3129)
MAX_CONCURRENT_SCRAPES: Final = 16
REQUEST_TIMEOUT: Final = 10.0
LABEL_CACHE_SIZE: Final = 100_000
PARENT_CHECK_EVERY: Final = 1.0
# Restart back-off of a dead exporter: 1 s, 2 s, 4 s ... 30 s; reset after a minute of life.
FIRST_BACKOFF: Final = 1.0
MAX_BACKOFF: Final = 30.0
HEALTHY_AFTER: Final = 60.0

RESTART_EXIT: Final = "exit"  # a worker exited by itself (crash, unexpected exit status)
RESTART_SIGNAL: Final = "signal"  # a worker was killed by a signal (OOM killer, kill -9)
RESTART_MAX_RSS: Final = "max_rss"  # replaced for exceeding [supervisor] worker-max-rss
RESTART_TIMEOUT: Final = "timeout"  # killed: no heartbeat for [supervisor] worker-timeout
RESTART_REASONS: Final = (RESTART_EXIT, RESTART_SIGNAL, RESTART_MAX_RSS, RESTART_TIMEOUT)
RELOAD_RESULTS: Final = ("success", "failure")

TEXT_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE: Final = "application/openmetrics-text; version=1.0.0; charset=utf-8"


class ExporterError(Exception):
    """The exporter cannot start; the message names the address or the problem."""


# -- pool statistics -----------------------------------------------------------------------

POOL_MAGIC: Final = b"MTGWPOOL"
POOL_VERSION: Final = 2
POOL_SIZE: Final = 72
_POOL_HEADER = struct.Struct("<8sII")
_RESTARTS_AT: Final = 3  # index of the first restart counter, in u64 words
_RELOADS_AT: Final = _RESTARTS_AT + len(RESTART_REASONS)


class PoolCounters:
    """Worker restarts, reloads and the supervisor's start time, in shared memory.

    The supervisor creates it (:meth:`create`) and is its only writer; the exporter maps
    the same file read-only (:meth:`attach`). Layout in the module docstring.
    """

    def __init__(self, segment: Segment) -> None:
        """Internal: use :meth:`create` or :meth:`attach`."""
        self.segment = segment
        view = memoryview(segment.map)
        self._view = view
        self._words = view[: POOL_SIZE - POOL_SIZE % 8].cast("Q")
        self._doubles = view[: POOL_SIZE - POOL_SIZE % 8].cast("d")

    @classmethod
    def create(cls, directory: str | None = None, started_at: float | None = None) -> PoolCounters:
        """Create the segment (supervisor side). Raises OSError."""
        from supervisor.shm import Segment

        segment = Segment("pool", POOL_SIZE, directory)
        segment.map[: _POOL_HEADER.size] = _POOL_HEADER.pack(POOL_MAGIC, POOL_VERSION, 0)
        counters = cls(segment)
        counters._doubles[2] = time.time() if started_at is None else started_at
        return counters

    @classmethod
    def attach(cls, path: str) -> PoolCounters:
        """Map an existing segment read-only (exporter side). Raises OSError, ValueError."""
        from supervisor.shm import Segment

        segment = Segment.attach(path)
        try:
            if segment.size < POOL_SIZE:
                raise ValueError(f"{path}: too small for pool counters")
            magic, version, _ = _POOL_HEADER.unpack(segment.map[: _POOL_HEADER.size])
            if magic != POOL_MAGIC or version != POOL_VERSION:
                raise ValueError(f"{path}: not pool counters of layout version {POOL_VERSION}")
            return cls(segment)
        except BaseException:
            segment.close(unlink=False)
            raise

    @property
    def path(self) -> str:
        return self.segment.path

    @property
    def started_at(self) -> float:
        return float(self._doubles[2])

    def worker_restarted(self, reason: str) -> None:
        """Count one worker restart; ``reason`` is one of :data:`RESTART_REASONS`.

        Raises ValueError for another reason.
        """
        index = _RESTARTS_AT + RESTART_REASONS.index(reason)
        self._words[index] += 1

    def reload_finished(self, succeeded: bool) -> None:
        """Count one reload (SIGHUP) that completed or was given up."""
        self._words[_RELOADS_AT + (0 if succeeded else 1)] += 1

    def restarts(self) -> dict[str, int]:
        return {r: int(self._words[_RESTARTS_AT + i]) for i, r in enumerate(RESTART_REASONS)}

    def reloads(self) -> dict[str, int]:
        return {r: int(self._words[_RELOADS_AT + i]) for i, r in enumerate(RELOAD_RESULTS)}

    def close(self, *, unlink: bool = True) -> None:
        """Release the mapping (and remove the file: creator only)."""
        for view in (self._words, self._doubles, self._view):
            view.release()
        self.segment.close(unlink=unlink)


def restart_reason(exit_code: int) -> str:
    """The restart reason for a worker that died with ``exit_code`` (as returned by
    ``os.waitstatus_to_exitcode``: negative = killed by that signal)."""
    return RESTART_SIGNAL if exit_code < 0 else RESTART_EXIT


@dataclass(frozen=True)
class WorkerStats:
    """One worker process as the pool metrics show it."""

    slot: int
    pid: int
    state: WorkerState
    sessions: int
    rss: int | None  # bytes; None until the supervisor sampled it
    cpu_seconds: float | None
    fds: int | None


@dataclass(frozen=True)
class PoolSnapshot:
    """What the exporter needs from the supervisor for the pool metrics."""

    started_at: float
    workers: tuple[WorkerStats, ...] = ()
    restarts: Mapping[str, int] = field(default_factory=dict)
    reloads: Mapping[str, int] = field(default_factory=dict)


PoolStatsSource = Callable[[], "PoolSnapshot | None"]


class SharedPoolStats:
    """A :data:`PoolStatsSource` over the scoreboard and the :class:`PoolCounters`."""

    def __init__(self, scoreboard: Scoreboard | None, counters: PoolCounters | None) -> None:
        self.scoreboard = scoreboard
        self.counters = counters

    @classmethod
    def attach(cls, scoreboard_path: str | None, counters_path: str | None) -> SharedPoolStats:
        """Map the supervisor's segments read-only (exporter side). Raises OSError,
        ValueError."""
        from supervisor.shm import Scoreboard

        scoreboard = Scoreboard.attach(scoreboard_path) if scoreboard_path else None
        counters = PoolCounters.attach(counters_path) if counters_path else None
        return cls(scoreboard, counters)

    def __call__(self) -> PoolSnapshot | None:
        if self.scoreboard is None and self.counters is None:
            return None
        workers: list[WorkerStats] = []
        if self.scoreboard is not None:
            for record in self.scoreboard.records():
                sampled = record.sampled_at > 0
                workers.append(
                    WorkerStats(
                        slot=record.slot,
                        pid=record.pid,
                        state=record.state,
                        sessions=record.sessions,
                        rss=record.rss if sampled else None,
                        cpu_seconds=record.cpu_user + record.cpu_system if sampled else None,
                        fds=record.fds if sampled else None,
                    )
                )
        counters = self.counters
        return PoolSnapshot(
            started_at=counters.started_at if counters is not None else 0.0,
            workers=tuple(workers),
            restarts=counters.restarts() if counters is not None else {},
            reloads=counters.reloads() if counters is not None else {},
        )


# -- reading the multiprocess files --------------------------------------------------------

Labels = tuple[tuple[str, str], ...]


class _FileIndex:
    """Where the values of one multiprocess file are: (offset, sample, labels) per key.

    prometheus-client's file is append-only (a new key goes at the end, then the header's
    ``used`` grows), so the index of a file only ever grows while it is the same file."""

    __slots__ = ("entries", "inode", "used")

    def __init__(self, inode: int) -> None:
        self.inode = inode
        self.used = 8  # the header: u32 used + 4 bytes padding
        self.entries: list[tuple[int, str, Labels]] = []


_USED = struct.Struct("<i")
_VALUE = struct.Struct("<dd")


class MultiprocReader:
    """Sums the workers' multiprocess files: counters and ``livesum`` gauges add up,
    ``livemostrecent`` gauges keep the newest value.

    The file format is prometheus-client's (``prometheus_client/mmap_dict.py``: u32 used,
    4 bytes padding, then per key u32 length, the UTF-8 JSON key padded to 8 bytes, f64
    value, f64 timestamp). The position and the parsed key of every value are remembered
    between scrapes, so a scrape reads each file once and unpacks only the numbers: a few
    milliseconds for tens of thousands of values.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._index: dict[str, _FileIndex] = {}
        self._keys: dict[bytes, tuple[str, Labels]] = {}
        self._bad_files: set[str] = set()

    def read(self) -> dict[str, dict[Labels, float]]:
        """Return {sample name: {sorted label pairs: value}} over every file."""
        totals: dict[tuple[str, Labels], float] = {}
        newest: dict[tuple[str, Labels], tuple[float, float]] = {}
        try:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(".db"))
        except OSError:
            names = []
        for name in names:
            parts = name[:-3].split("_")
            most_recent = parts[0] == "gauge" and len(parts) == 3 and "mostrecent" in parts[1]
            path = os.path.join(self.directory, name)
            try:
                with open(path, "rb") as stream:
                    inode = os.fstat(stream.fileno()).st_ino
                    data = stream.read()
                index = self._update_index(name, inode, data)
            except FileNotFoundError:  # a dead worker's live gauges, reaped meanwhile
                continue
            except (OSError, ValueError, struct.error) as exc:
                self._index.pop(name, None)
                if path not in self._bad_files:
                    self._bad_files.add(path)
                    _log.error(
                        "cannot read a metrics file", extra={"path": path, "error": str(exc)}
                    )
                continue
            unpack = _VALUE.unpack_from
            if most_recent:
                for offset, sample, labels in index.entries:
                    value, timestamp = unpack(data, offset)
                    key = (sample, labels)
                    if timestamp >= newest.get(key, (-1.0, 0.0))[0]:
                        newest[key] = (timestamp, value)
            else:
                get = totals.get
                for offset, sample, labels in index.entries:
                    key = (sample, labels)
                    totals[key] = get(key, 0.0) + unpack(data, offset)[0]
        for name in set(self._index).difference(names):
            del self._index[name]
        result: dict[str, dict[Labels, float]] = {}
        for (sample, labels), number in totals.items():
            result.setdefault(sample, {})[labels] = number
        for (sample, labels), (_, number) in newest.items():
            result.setdefault(sample, {})[labels] = number
        return result

    def _update_index(self, name: str, inode: int, data: bytes) -> _FileIndex:
        """The index of ``data`` (file ``name``), extended by the keys added since the
        last scrape. Raises ValueError when the file is not in the expected format."""
        if len(data) < 8 or _USED.unpack_from(data, 0)[0] == 0:
            return _FileIndex(inode)  # being created by its worker right now: no values yet
        used = _USED.unpack_from(data, 0)[0]
        if used > len(data):
            raise ValueError(f"header says {used} bytes are used, the file has {len(data)}")
        index = self._index.get(name)
        if index is None or index.inode != inode or used < index.used:
            index = self._index[name] = _FileIndex(inode)
        pos = index.used
        keys = self._keys
        while pos < used:
            length = _USED.unpack_from(data, pos)[0]
            if length <= 0 or pos + 4 + length > used:
                raise ValueError(f"entry at {pos} runs past the used bytes")
            raw = data[pos + 4 : pos + 4 + length]
            pos += 4 + length + (8 - (length + 4) % 8)
            parsed = keys.get(raw)
            if parsed is None:
                if len(keys) > LABEL_CACHE_SIZE:
                    keys.clear()
                parsed = keys[raw] = _parse_key(raw)
            index.entries.append((pos, parsed[0], parsed[1]))
            pos += 16
        if pos != used:
            raise ValueError(f"entries end at {pos}, the header says {used}")
        index.used = used
        return index


def _parse_key(raw: bytes) -> tuple[str, Labels]:
    _metric, sample, labels, _help = json.loads(raw)
    return str(sample), tuple(sorted((str(k), str(v)) for k, v in labels.items()))


# -- exposition ----------------------------------------------------------------------------


@dataclass
class Family:
    """One metric family to serve. ``name`` is the family name (counters without
    ``_total``); samples are (labels, value); ``mtg`` marks mtg's counters, which also get
    the bare-name compatibility copy in the classic text format."""

    name: str
    kind: str  # counter, gauge
    help: str
    samples: list[tuple[Labels, float]]
    mtg: bool = False


_EXACT_INT: Final = float(2**53)


def go_float(value: float) -> str:
    """Format ``value`` like Go's ``strconv.FormatFloat(v, 'g', -1, 64)`` (what mtg's
    exposition prints): ``200``, ``0.25``, ``1.5e+06``, ``+Inf``, ``NaN``."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    if value.is_integer() and -_EXACT_INT < value < _EXACT_INT:
        # Below 2**53 an integral double's shortest digits are the integer's own.
        digits = str(int(value))
        if -1e6 < value < 1e6:
            return digits
        sign = ""
        if digits[0] == "-":
            sign, digits = "-", digits[1:]
        exponent = len(digits) - 1
        digits = digits.rstrip("0")
        rest = "." + digits[1:] if len(digits) > 1 else ""
        return f"{sign}{digits[0]}{rest}e+{exponent:02d}"
    text = repr(float(value))
    sign = ""
    if text[0] == "-":
        sign, text = "-", text[1:]
    mantissa, _, exp_text = text.partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    point = len(whole) + (int(exp_text) if exp_text else 0)  # digits before the point
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0") or "0"
    exponent = point - 1
    if exponent < -4 or exponent >= 6:  # Go's %e rule for the shortest representation
        rest = "." + digits[1:] if len(digits) > 1 else ""
        return f"{sign}{digits[0]}{rest}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sort_key(item: tuple[Labels, float]) -> tuple[str, ...]:
    return tuple(value for _, value in item[0])


def render_text(families: Iterable[Family], label_cache: dict[Labels, str] | None = None) -> bytes:
    """The classic text format (0.0.4), mtg's bare counter names included.

    ``label_cache`` keeps the rendered ``{...}`` of label sets between scrapes.
    """
    cache: dict[Labels, str] = {} if label_cache is None else label_cache
    blocks: list[tuple[str, str, str, list[tuple[Labels, float]]]] = []
    for family in families:
        if family.kind == "counter":
            blocks.append((family.name + "_total", "counter", family.help, family.samples))
            if family.mtg:
                blocks.append((family.name, "untyped", family.help, family.samples))
        else:
            blocks.append((family.name, family.kind, family.help, family.samples))
    out: list[str] = []
    for name, kind, help_text, samples in sorted(blocks, key=lambda block: block[0]):
        if not samples:
            continue
        out.append(f"# HELP {name} {_escape_help(help_text)}\n# TYPE {name} {kind}\n")
        for labels, value in sorted(samples, key=_sort_key):
            rendered = cache.get(labels)
            if rendered is None:
                rendered = cache[labels] = _render_labels(labels)
            out.append(f"{name}{rendered}{go_float(value)}\n")
    return "".join(out).encode()


def render_openmetrics(
    families: Iterable[Family], label_cache: dict[Labels, str] | None = None
) -> bytes:
    """OpenMetrics 1.0 text: counters as families whose samples end in ``_total``, as
    client_golang (mtg) writes them when the scraper asks for OpenMetrics."""
    cache: dict[Labels, str] = {} if label_cache is None else label_cache
    out: list[str] = []
    for family in sorted(families, key=lambda f: f.name):
        if not family.samples:
            continue
        name = family.name
        help_text = _escape_help(family.help).replace('"', '\\"')
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} {family.kind}\n")
        sample = name + "_total" if family.kind == "counter" else name
        for labels, value in sorted(family.samples, key=_sort_key):
            rendered = cache.get(labels)
            if rendered is None:
                rendered = cache[labels] = _render_labels(labels)
            out.append(f"{sample}{rendered}{go_float(value)}\n")
    out.append("# EOF\n")
    return "".join(out).encode()


def _render_labels(labels: Labels) -> str:
    """``{a="1",b="2"} `` (with the space before the value), or ``" "``."""
    if not labels:
        return " "
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels) + "} "


class Scraper:
    """Builds the families of one scrape from the multiprocess directory and the pool.

    Thread-safe: concurrent scrapes are serialised (reaping dead workers' gauges and
    reading the files take a few milliseconds; scrapes are rare).
    """

    def __init__(
        self,
        multiproc_dir: str,
        metric_prefix: str,
        pool_stats_source: PoolStatsSource | None = None,
    ) -> None:
        self.multiproc_dir = multiproc_dir
        self.prefix = metric_prefix
        self.pool_stats_source = pool_stats_source
        self._reader = MultiprocReader(multiproc_dir)
        self._lock = threading.Lock()
        self._labels: dict[Labels, str] = {}

    def families(self) -> list[Family]:
        """Every family of a scrape (mtg's, then the pool's)."""
        with self._lock:
            reaped = reap_dead_workers(self.multiproc_dir)
            if reaped:
                _log.debug("metrics of dead workers dropped", extra={"workers": reaped})
            data = self._reader.read()
        prefix = self.prefix
        families: list[Family] = []
        for spec in MTG_METRICS:
            name = f"{prefix}_{spec.name}"
            sample = name + "_total" if spec.kind == "counter" else name
            series = data.get(sample, {})
            samples = list(series.items())
            if not samples and not spec.labels and spec.kind == "counter":
                samples = [((), 0.0)]  # mtg's plain counters exist from the start
            families.append(Family(name, spec.kind, spec.help, samples, mtg=spec.kind == "counter"))
        if self.pool_stats_source is not None:
            try:
                snapshot = self.pool_stats_source()
            except Exception as exc:  # the scrape still serves mtg's metrics
                _log.error("cannot read the pool statistics", extra={"error": repr(exc)})
                snapshot = None
            if snapshot is not None:
                families += pool_families(prefix, snapshot)
        return families

    def scrape(self, openmetrics: bool = False) -> tuple[bytes, str]:
        """(body, content type) of one scrape in the classic format or OpenMetrics."""
        families = self.families()
        if len(self._labels) > LABEL_CACHE_SIZE:  # series churn (worker PIDs): start over
            self._labels = {}
        if openmetrics:
            return render_openmetrics(families, self._labels), OPENMETRICS_CONTENT_TYPE
        return render_text(families, self._labels), TEXT_CONTENT_TYPE


def pool_families(prefix: str, snapshot: PoolSnapshot) -> list[Family]:
    """The supervisor's metrics (not in mtg) from a :class:`PoolSnapshot`."""
    states = dict.fromkeys(WORKER_STATES, 0)
    sessions: list[tuple[Labels, float]] = []
    rss: list[tuple[Labels, float]] = []
    cpu: list[tuple[Labels, float]] = []
    fds: list[tuple[Labels, float]] = []
    for worker in snapshot.workers:
        states[worker.state] = states.get(worker.state, 0) + 1
        if worker.pid <= 0:  # forked a moment ago, its PID not recorded yet
            continue
        labels: Labels = (("pid", str(worker.pid)), ("slot", str(worker.slot)))
        sessions.append((labels, float(worker.sessions)))
        if worker.rss is not None:
            rss.append((labels, float(worker.rss)))
        if worker.cpu_seconds is not None:
            cpu.append((labels, worker.cpu_seconds))
        if worker.fds is not None:
            fds.append((labels, float(worker.fds)))
    p = prefix + "_"
    families = [
        Family(
            p + "workers",
            "gauge",
            "Worker processes of the supervisor by state (booting, ready, retiring).",
            [((("state", state),), float(count)) for state, count in states.items()],
        ),
        Family(p + "worker_sessions", "gauge", "Client sessions of each worker process.", sessions),
        Family(
            p + "worker_resident_memory_bytes",
            "gauge",
            "Resident memory of each worker process (sampled every second).",
            rss,
        ),
        Family(
            p + "worker_cpu_seconds",
            "counter",
            "CPU time (user + system) used by each worker process (sampled every second).",
            cpu,
        ),
        Family(
            p + "worker_open_fds",
            "gauge",
            "Open file descriptors of each worker process (sampled every second).",
            fds,
        ),
    ]
    if snapshot.started_at > 0:
        families += [
            Family(
                p + "worker_restarts",
                "counter",
                "Workers restarted by the supervisor, by reason (exit, signal, max_rss, timeout).",
                [((("reason", r),), float(snapshot.restarts.get(r, 0))) for r in RESTART_REASONS],
            ),
            Family(
                p + "reloads",
                "counter",
                "Configuration reloads (SIGHUP), by result (success, failure).",
                [((("result", r),), float(snapshot.reloads.get(r, 0))) for r in RELOAD_RESULTS],
            ),
            Family(
                p + "supervisor_start_time_seconds",
                "gauge",
                "Start time of the supervisor since the Unix epoch in seconds.",
                [((), snapshot.started_at)],
            ),
        ]
    return families


# -- HTTP ----------------------------------------------------------------------------------


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
    sock = bind_to if isinstance(bind_to, socket.socket) else _listen(_host_port(bind_to))
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


def _listen(address: HostPort) -> socket.socket:
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


# -- the supervisor's handle ---------------------------------------------------------------


class Exporter:
    """The exporter process as the supervisor (or ``serve()``) sees it.

    Life cycle, all from the owner's single thread::

        # before forking workers:
        exporter = Exporter(config.stats.prometheus, scoreboard=scoreboard)
        exporter.start()
        ...  # in the loop, about once a second:
        exporter.poll()
        ...  # on events:
        exporter.worker_restarted(restart_reason(code)); exporter.reload_finished(True)
        exporter.close()  # at exit: stops the process, removes the directory

    The constructor creates the metrics directory, sets ``PROMETHEUS_MULTIPROC_DIR`` in
    this process's environment (workers forked afterwards inherit it) and binds the
    listening socket; it raises :class:`ExporterError` when the address cannot be bound
    and OSError when the directory or the shared memory cannot be made.
    """

    def __init__(
        self,
        prometheus: Prometheus,
        *,
        scoreboard: Scoreboard | None = None,
        debug: bool = False,
        directory_parent: str | None = None,
    ) -> None:
        self.config = prometheus
        self.debug = debug
        self.scoreboard = scoreboard
        self.bind_to = prometheus.bind_to or DEFAULT_BIND
        self.multiproc_dir = create_multiproc_dir(directory_parent)
        self.pool: PoolCounters | None = None
        try:
            self.sock = _listen(self.bind_to)
            if scoreboard is not None:
                self.pool = PoolCounters.create()
        except BaseException:
            if hasattr(self, "sock"):
                self.sock.close()
            remove_multiproc_dir(self.multiproc_dir)
            raise
        os.environ[MULTIPROC_ENV] = self.multiproc_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self._spawned_at = 0.0
        self._restart_at = 0.0
        self._failures = 0
        self._closed = False

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually listened on (port 0 in the config is resolved)."""
        name = self.sock.getsockname()
        return str(name[0]), int(name[1])

    @property
    def pid(self) -> int | None:
        """PID of the running exporter process, None when it is not running."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the exporter process (no-op when it runs). Raises OSError."""
        if self._proc is not None or self._closed:
            return
        argv = [
            sys.executable,
            "-m",
            "supervisor.exporter",
            "--listen-fd",
            str(self.sock.fileno()),
            "--http-path",
            self.config.http_path,
            "--metric-prefix",
            self.config.metric_prefix,
            "--multiproc-dir",
            self.multiproc_dir,
            "--parent-pid",
            str(os.getpid()),
        ]
        if self.scoreboard is not None:
            argv += ["--scoreboard", self.scoreboard.path]
        if self.pool is not None:
            argv += ["--pool", self.pool.path]
        if self.debug:
            argv.append("--debug")
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        sys.stdout.flush()
        sys.stderr.flush()
        self._proc = subprocess.Popen(
            argv, pass_fds=(self.sock.fileno(),), stdin=subprocess.DEVNULL, env=env
        )
        self._spawned_at = time.monotonic()
        _log.debug("metrics exporter started", extra={"pid": self._proc.pid})

    def poll(self, now: float | None = None) -> None:
        """Restart the exporter when it died (back-off 1 s doubling to 30 s)."""
        if self._closed:
            return
        now = time.monotonic() if now is None else now
        proc = self._proc
        if proc is not None:
            code = proc.poll()  # 0 when the supervisor's waitpid(-1) reaped it first
            if code is None:
                if self._failures and now - self._spawned_at >= HEALTHY_AFTER:
                    self._failures = 0
                return
            self._proc = None
            self._failures += 1
            delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (self._failures - 1))
            self._restart_at = now + delay
            _log.warning(
                "metrics exporter exited; restarting it",
                extra={"pid": proc.pid, "status": code, "restart_in": delay},
            )
        if now >= self._restart_at:
            try:
                self.start()
            except OSError as exc:
                _log.error("cannot start the metrics exporter", extra={"error": str(exc)})
                self._restart_at = now + MAX_BACKOFF

    def owns(self, pid: int) -> bool:
        """True when ``pid`` is the exporter process (for a supervisor reaping children)."""
        return self._proc is not None and self._proc.pid == pid

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the exporter process: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)

    def close(self) -> None:
        """Stop the process, close the socket, remove the directory and the segment."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        self.sock.close()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        remove_multiproc_dir(self.multiproc_dir)
        if os.environ.get(MULTIPROC_ENV) == self.multiproc_dir:
            del os.environ[MULTIPROC_ENV]

    # -- pool counters (no-ops without a scoreboard) ---------------------------------------

    def worker_restarted(self, reason: str) -> None:
        """Count a worker restart (:data:`RESTART_REASONS`; see :func:`restart_reason`)."""
        if self.pool is not None:
            self.pool.worker_restarted(reason)

    def reload_finished(self, succeeded: bool) -> None:
        """Count a reload that completed (True) or was given up (False)."""
        if self.pool is not None:
            self.pool.reload_finished(succeeded)


# -- the exporter process ------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the exporter process (``python -m supervisor.exporter``)."""
    parser = argparse.ArgumentParser(prog="python -m supervisor.exporter")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--http-path", default="/")
    parser.add_argument("--metric-prefix", default="mtg")
    parser.add_argument("--multiproc-dir", required=True)
    parser.add_argument("--parent-pid", type=int)
    parser.add_argument("--scoreboard")
    parser.add_argument("--pool")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)

    from mtgworkers import logs

    logs.setup(args.debug)
    if args.parent_pid is not None:
        from supervisor.worker import set_parent_death_signal

        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != args.parent_pid:  # it died before prctl() took effect
            return 0
    sock = socket.socket(fileno=args.listen_fd)
    source: PoolStatsSource | None = None
    try:
        if args.scoreboard or args.pool:
            source = SharedPoolStats.attach(args.scoreboard, args.pool)
        run_exporter(
            sock,
            args.http_path,
            args.metric_prefix,
            args.multiproc_dir,
            source,
            parent_pid=args.parent_pid,
        )
    except Exception as exc:
        _log.error("metrics exporter failed", extra={"error": repr(exc)}, exc_info=exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
