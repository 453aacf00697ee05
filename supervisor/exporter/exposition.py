"""Exposition: the metric families of one scrape, in the classic text format or OpenMetrics.

mtg's ten metrics keep mtg's names, types, labels and help texts, under
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

Worker metrics of ours (same prefix; not in mtg, so no bare-name copy):
:data:`~mtgworkers.stats.prometheus.OUR_METRICS`, e.g. ``accept_refused_total{reason}``.

Pool metrics (same prefix; not in mtg): ``workers{state}``, ``worker_sessions``,
``worker_resident_memory_bytes``, ``worker_cpu_seconds_total``, ``worker_open_fds`` (per
worker, labels ``slot`` and ``pid``), ``worker_restarts_total{reason}``,
``reloads_total{result}`` and ``supervisor_start_time_seconds``, from a
:class:`~supervisor.exporter.pool.PoolSnapshot`.

:class:`Scraper` puts one scrape together: it drops dead workers' live gauges, sums the
multiprocess files (:mod:`supervisor.exporter.multiproc`), adds the pool's families and
renders the result.

Kernel families (same prefix; :mod:`supervisor.exporter.kernel`): the nstat TCP
counters of the network namespace (``kernel_tcp_listen_drops_total`` …) and each slot's
accept queue (``listen_queue_length{slot}``, ``listen_queue_backlog{slot}``), read at
scrape time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from mtgworkers.events import ACCEPT_REFUSED_REASONS
from mtgworkers.stats.prometheus import (
    ACCEPT_REFUSED,
    MTG_METRICS,
    OUR_METRICS,
    reap_dead_workers,
)
from supervisor.exporter.kernel import SlotQueues, kernel_families
from supervisor.exporter.multiproc import LABEL_CACHE_SIZE, Labels, MultiprocReader
from supervisor.exporter.pool import (
    RELOAD_RESULTS,
    RESTART_REASONS,
    PoolSnapshot,
    PoolStatsSource,
)
from supervisor.states import WORKER_STATES

__all__ = [
    "OPENMETRICS_CONTENT_TYPE",
    "TEXT_CONTENT_TYPE",
    "Family",
    "Scraper",
    "go_float",
    "pool_families",
    "render_openmetrics",
    "render_text",
]

_log = logging.getLogger("mtgworkers.exporter")


TEXT_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE: Final = "application/openmetrics-text; version=1.0.0; charset=utf-8"


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
        self._slot_queues = SlotQueues()

    def families(self) -> list[Family]:
        """Every family of a scrape (mtg's, the pool's, then the kernel's)."""
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
        for spec in OUR_METRICS:  # no bare-name copies: mtg has none of these
            name = f"{prefix}_{spec.name}"
            series = dict(data.get(name + "_total" if spec.kind == "counter" else name, {}))
            if spec is ACCEPT_REFUSED:  # every reason from the start, 0 until the first
                for reason in ACCEPT_REFUSED_REASONS:
                    series.setdefault((("reason", reason),), 0.0)
            elif not series and not spec.labels and spec.kind == "counter":
                series[()] = 0.0
            families.append(Family(name, spec.kind, spec.help, list(series.items())))
        snapshot: PoolSnapshot | None = None
        if self.pool_stats_source is not None:
            try:
                snapshot = self.pool_stats_source()
            except Exception as exc:  # the scrape still serves mtg's metrics
                _log.error("cannot read the pool statistics", extra={"error": repr(exc)})
                snapshot = None
            if snapshot is not None:
                families += pool_families(prefix, snapshot)
        workers = [(w.slot, w.pid) for w in snapshot.workers] if snapshot is not None else []
        try:
            with self._lock:  # the slot-to-socket cache is shared by concurrent scrapes
                kernel = kernel_families(prefix, workers, self._slot_queues)
        except Exception as exc:  # the scrape still serves everything else
            _log.error("cannot read the kernel's TCP figures", extra={"error": repr(exc)})
            kernel = []
        families += [Family(*data) for data in kernel]
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
