"""The metrics exporter: a separate process serving the workers' metrics over HTTP.

Workers write their values into prometheus-client multiprocess files (see
:mod:`mtgworkers.stats.prometheus`); this process reads and sums them for every scrape
and serves the result on ``[stats.prometheus] bind-to`` + ``http-path``. Workers never
wait for it: a slow, hung or crashed exporter costs scrapes, never connections.

The parts, each in its module:

- :mod:`~supervisor.exporter.pool`: :class:`PoolCounters`, the shared memory segment
  (with its byte layout) where the supervisor counts worker restarts by reason and
  reloads, next to its start time; with the scoreboard (``supervisor/shm.py``) it is
  the exporter's pool stats source (:class:`SharedPoolStats`).
- :mod:`~supervisor.exporter.multiproc`: :class:`MultiprocReader`, which sums the
  workers' multiprocess files (one set per stable worker cell id).
- :mod:`~supervisor.exporter.exposition`: the families of a scrape (:class:`Scraper`)
  in the classic text format or OpenMetrics: mtg's names, ``_total`` counters plus mtg's
  bare names as ``untyped`` copies, Go's number format, the pool's metrics.
- :mod:`~supervisor.exporter.kernel`: the kernel's TCP counters (``/proc/net/netstat``,
  ``/proc/net/snmp``) and each worker slot's accept queue, read at scrape time.
- :mod:`~supervisor.exporter.httpd`: the HTTP server (Go ``ServeMux`` paths, HEAD, gzip,
  a cap on concurrent scrapes) and :func:`run_exporter`, the exporter process's body.
- :mod:`~supervisor.exporter.process`: :class:`Exporter`, the supervisor's handle on the
  exporter process (start, poll, close, restart with back-off), and :func:`main`, the
  process's entry point (``python -m supervisor.exporter``).

Worker metrics of ours (same prefix; not in mtg, so no bare-name copy) are
:data:`~mtgworkers.stats.prometheus.OUR_METRICS`, e.g. ``accept_refused_total{reason}``.

This package re-exports what the supervisor uses.
"""

from __future__ import annotations

from supervisor.exporter.exposition import Scraper, go_float
from supervisor.exporter.httpd import ExporterError, run_exporter
from supervisor.exporter.pool import (
    RELOAD_RESULTS,
    RESTART_EXIT,
    RESTART_MAX_RSS,
    RESTART_REASONS,
    RESTART_SIGNAL,
    RESTART_TIMEOUT,
    PoolCounters,
    PoolSnapshot,
    PoolStatsSource,
    SharedPoolStats,
    WorkerStats,
    restart_reason,
)
from supervisor.exporter.process import DEFAULT_BIND, Exporter, main

__all__ = [
    "DEFAULT_BIND",
    "RELOAD_RESULTS",
    "RESTART_EXIT",
    "RESTART_MAX_RSS",
    "RESTART_REASONS",
    "RESTART_SIGNAL",
    "RESTART_TIMEOUT",
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
    "restart_reason",
    "run_exporter",
]
