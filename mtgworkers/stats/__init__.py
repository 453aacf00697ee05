"""Metrics observers: they turn the proxy's events into Prometheus values and statsd lines.

The proxy core (session, relay, server) only sends :mod:`mtgworkers.events`; it imports
no metrics library. A worker process gets its observers from :func:`make_observers`
(through :func:`mtgworkers.server.build_worker`) and subscribes them to its
:class:`~mtgworkers.events.EventStream`:

- :class:`~mtgworkers.stats.prometheus.PrometheusObserver` (``[stats.prometheus]``) writes
  prometheus-client multiprocess files; the exporter process
  (``supervisor/exporter/``) serves their sum over HTTP;
- :class:`~mtgworkers.stats.statsd.StatsdObserver` (``[stats.statsd]``) sends statsd
  lines over UDP.

Both are called synchronously in the worker's event loop, once per connection event or
traffic batch, never per relayed chunk.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Protocol

from mtgworkers.stats.prometheus import MULTIPROC_ENV, PrometheusObserver, StatsError
from mtgworkers.stats.statsd import StatsdObserver

if TYPE_CHECKING:
    from mtgworkers.config import Config
    from mtgworkers.events import Event

__all__ = ["StatsError", "StatsObserver", "enabled", "make_observers"]


class StatsObserver(Protocol):
    """What :func:`make_observers` returns: an event observer with a life cycle."""

    def __call__(self, event: Event) -> None: ...

    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...

    def close(self) -> None: ...


def enabled(config: Config) -> bool:
    """True when ``[stats.prometheus]`` or ``[stats.statsd]`` is enabled."""
    return config.stats.prometheus.enabled or config.stats.statsd.enabled


def make_observers(
    config: Config, worker_slot: int | str, *, multiproc_dir: str | None = None
) -> list[StatsObserver]:
    """Build the observers ``config`` enables, for the calling worker process.

    Call it in the worker process (after fork), before the worker sends events.
    ``worker_slot`` names this process's Prometheus files: it must be unique among the
    worker processes alive at the same time and should be reused by the process that
    replaces a dead one (under the supervisor: the worker's scoreboard cell), see
    :mod:`mtgworkers.stats.prometheus`. ``multiproc_dir`` defaults to the
    ``PROMETHEUS_MULTIPROC_DIR`` environment variable, which the supervisor sets to
    the directory it created for its exporter.

    Returns an empty list when stats are off. Raises :class:`StatsError` when an enabled
    observer cannot work (no metrics directory, no statsd address, id in use), OSError
    when the metrics directory is unusable.
    """
    observers: list[StatsObserver] = []
    prometheus = config.stats.prometheus
    statsd = config.stats.statsd
    try:
        if prometheus.enabled:
            directory = multiproc_dir or os.environ.get(MULTIPROC_ENV)
            if not directory or not os.path.isdir(directory):
                raise StatsError(
                    "[stats.prometheus] is enabled but no metrics directory was prepared: the "
                    "supervisor creates it and sets " + MULTIPROC_ENV
                )
            observers.append(PrometheusObserver(prometheus.metric_prefix, worker_slot, directory))
        if statsd.enabled:
            if statsd.address is None:
                raise StatsError("stats.statsd.address: required when statsd is enabled")
            observers.append(
                StatsdObserver(
                    statsd.address.host,
                    statsd.address.port,
                    statsd.metric_prefix,
                    statsd.tag_format,
                )
            )
    except BaseException:
        for observer in observers:
            observer.close()
        raise
    return observers
