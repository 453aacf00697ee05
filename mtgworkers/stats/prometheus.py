"""Prometheus observer: proxy events -> prometheus-client multiprocess values (mmap files).

Every worker process writes its own values into files of a shared directory (the
"multiprocess directory", ``PROMETHEUS_MULTIPROC_DIR``); the exporter process
(``supervisor/exporter/``) reads and sums them for each scrape. Workers never talk to
the exporter and never wait for it: a slow or hung scrape cannot block a worker.

Directory layout (created by :func:`create_multiproc_dir`, mode 0700, private to one
supervisor; the exporter and every worker of that supervisor use it)::

    counter_<id>.db               prometheus-client's mmap format: the worker's counters
    gauge_livesum_<id>.db         ... its connection gauges (summed over live workers)
    gauge_livemostrecent_<id>.db  ... iplist_size (the latest value any live worker set)
    worker-<id>.lock              flock()ed (LOCK_EX) by the live worker with that id

``<id>`` is the *worker id* given to :class:`PrometheusObserver`, used as
prometheus-client's process identifier instead of the PID. Under the supervisor it is the
worker's scoreboard cell: unique among the workers alive at the same time (two
generations of one slot run side by side during a reload, so the slot number itself is
not unique) and reused only after the previous owner died, so the number of files is
bounded by the number of cells however many times workers restart (client_python#367).

Why this keeps every promise a scrape relies on:

- Counters never go down. A dead worker's ``counter_<id>.db`` stays in the directory, so
  its totals are still summed. A new worker with the same id opens the same file and
  prometheus-client reads the stored value before the first increment: it continues
  from the dead worker's totals instead of restarting at zero. Only one live process
  ever writes a given file (the lock below makes sure of it), so there is no lost update.
- Live gauges disappear with their worker. A worker holds ``worker-<id>.lock`` for its
  whole life (the kernel releases it when the process dies, even by SIGKILL). The
  exporter, before each scrape, tries the lock of every id that has ``gauge_live*``
  files; when it gets the lock the owner is dead, and it deletes those files while
  holding it (:func:`reap_dead_workers`). A new worker takes the same lock before it
  touches any file, and deletes the live gauge files its dead predecessor left
  (:func:`claim_worker_id`), so a restarted worker never inherits stale connections.
- No values exist before fork: the value class with its process identifier and every
  value are created by the observer, in the worker process (client_python#127, #431).

Hot path: traffic is counted per session by the proxy and arrives here in batches
(``EventTraffic`` every ~5 s per session and at its end). Once :meth:`PrometheusObserver.start`
ran, an event only adds to a number in a dict; the changes are written to the files
once a second (:data:`WRITE_EVERY`), one mmap store per changed series. A scrape can
therefore lag a second behind, and a worker killed with SIGKILL loses at most its last
second of increments (its counters still never go down).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import ipaddress
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from mtgworkers import events
from mtgworkers.proc import pid_alive, shm_dir

__all__ = [
    "MTG_METRICS",
    "MULTIPROC_ENV",
    "OUR_METRICS",
    "MetricSpec",
    "PrometheusObserver",
    "StatsError",
    "claim_worker_id",
    "create_multiproc_dir",
    "ip_family",
    "reap_dead_workers",
    "remove_multiproc_dir",
]

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
DIR_PREFIX: Final = "mtgworkers-metrics-"
LOCK_PREFIX: Final = "worker-"
# prometheus-client splits file names on "_" to find the type and the mode: no "_" in ids.
_WORKER_ID_RE = re.compile(r"[0-9A-Za-z-]{1,32}")
_DIR_RE = re.compile(re.escape(DIR_PREFIX) + r"(\d+)-[A-Za-z0-9_]+\Z")
_LIVE_GAUGE_RE = re.compile(r"gauge_live[a-z]+_([0-9A-Za-z-]+)\.db\Z")
# Changes are collected in memory and written to the files this often (seconds).
WRITE_EVERY = 1.0
# How long a starting worker waits for its id's lock (the exporter holds it for a moment
# while it removes a dead predecessor's files).
CLAIM_TIMEOUT = 2.0


class StatsError(Exception):
    """Metrics cannot be set up; the message says why and what to change."""


@dataclass(frozen=True)
class MetricSpec:
    """A worker metric: name without prefix, type, label names (mtg's order for mtg's)."""

    name: str
    kind: str  # "counter" or "gauge"
    labels: tuple[str, ...]
    help: str
    mode: str = ""  # prometheus-client multiprocess mode (gauges only)


CLIENT_CONNECTIONS = MetricSpec(
    "client_connections",
    "gauge",
    ("ip_family",),
    "A number of actively processing client connections.",
    "livesum",
)
TELEGRAM_CONNECTIONS = MetricSpec(
    "telegram_connections",
    "gauge",
    ("telegram_ip", "dc"),
    "A number of connections to Telegram servers.",
    "livesum",
)
DOMAIN_FRONTING_CONNECTIONS = MetricSpec(
    "domain_fronting_connections",
    "gauge",
    ("ip_family",),
    "A number of connections which talk to front domain.",
    "livesum",
)
IPLIST_SIZE = MetricSpec(
    "iplist_size",
    "gauge",
    ("ip_list",),
    "A size of the ip list (blocklist or allowlist)",
    "livemostrecent",
)
TELEGRAM_TRAFFIC = MetricSpec(
    "telegram_traffic",
    "counter",
    ("telegram_ip", "dc", "direction"),
    "Traffic which is generated talking with Telegram servers.",
)
DOMAIN_FRONTING_TRAFFIC = MetricSpec(
    "domain_fronting_traffic",
    "counter",
    ("direction",),
    "Traffic which is generated talking with front domain.",
)
DOMAIN_FRONTING = MetricSpec(
    "domain_fronting", "counter", (), "A number of routings to front domain."
)
CONCURRENCY_LIMITED = MetricSpec(
    "concurrency_limited",
    "counter",
    (),
    "A number of sessions that were rejected by concurrency limiter.",
)
IP_BLOCKLISTED = MetricSpec(
    "ip_blocklisted",
    "counter",
    ("ip_list",),
    "A number of rejected sessions due to ip blocklisting.",
)
REPLAY_ATTACKS = MetricSpec("replay_attacks", "counter", (), "A number of detected replay attacks.")

# mtg's ten metrics (docs/mtg-compat.md c.1), in its order.
MTG_METRICS: Final = (
    CLIENT_CONNECTIONS,
    TELEGRAM_CONNECTIONS,
    DOMAIN_FRONTING_CONNECTIONS,
    IPLIST_SIZE,
    TELEGRAM_TRAFFIC,
    DOMAIN_FRONTING_TRAFFIC,
    DOMAIN_FRONTING,
    CONCURRENCY_LIMITED,
    IP_BLOCKLISTED,
    REPLAY_ATTACKS,
)

ACCEPT_REFUSED = MetricSpec(
    "accept_refused",
    "counter",
    ("reason",),
    "Client connections closed right after the accept because the worker was out of file "
    "descriptors, by reason (emfile: the process's open files limit, enfile: the system's).",
)

HELLOS_WITHOUT_SNI = MetricSpec(
    "client_hellos_without_sni",
    "counter",
    (),
    "Valid client hellos without a server_name extension (Telegram iOS), served.",
)

CONCURRENCY_EVICTED = MetricSpec(
    "concurrency_evicted",
    "counter",
    (),
    "Connections without a valid client hello yet that were closed to admit a new one "
    "while the concurrency limit was reached.",
)

# Metrics of ours, not mtg's: served under their Prometheus names only.
OUR_METRICS: Final = (ACCEPT_REFUSED, HELLOS_WITHOUT_SNI, CONCURRENCY_EVICTED)

TO_CLIENT = "to_client"  # bytes read from Telegram / the fronting host
FROM_CLIENT = "from_client"  # bytes written to them


def ip_family(ip: str) -> str:
    """mtg's ``ip_family`` label: ``ipv4`` when the address has an IPv4 form (IPv4-mapped
    IPv6 included, as Go's ``To4()``), else ``ipv6``."""
    if ":" not in ip:
        return "ipv4"
    try:
        address = ipaddress.IPv6Address(ip.split("%", 1)[0])
    except ValueError:
        return "ipv6"
    return "ipv4" if address.ipv4_mapped is not None else "ipv6"


# -- the multiprocess directory ------------------------------------------------------------


def create_multiproc_dir(parent: str | None = None) -> str:
    """Create an empty private metrics directory (mode 0700) and return its path.

    Directories of this kind left by processes that are gone (killed before they could
    remove theirs) are removed first. Raises OSError.
    """
    parent = parent or shm_dir()
    _remove_stale_dirs(parent)
    return tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=parent)


def remove_multiproc_dir(path: str) -> None:
    """Remove a directory made by :func:`create_multiproc_dir` (missing is fine)."""
    shutil.rmtree(path, ignore_errors=True)


def _remove_stale_dirs(parent: str) -> None:
    try:
        names = os.listdir(parent)
    except OSError:
        return
    uid = os.getuid()
    for name in names:
        match = _DIR_RE.match(name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        path = os.path.join(parent, name)
        with contextlib.suppress(OSError):
            if os.lstat(path).st_uid == uid:
                shutil.rmtree(path, ignore_errors=True)


def _check_worker_id(worker_id: str) -> str:
    if not _WORKER_ID_RE.fullmatch(worker_id):
        raise StatsError(
            f"invalid metrics worker id {worker_id!r}: letters, digits and '-' only (max 32)"
        )
    return worker_id


def _lock_path(directory: str, worker_id: str) -> str:
    return os.path.join(directory, f"{LOCK_PREFIX}{worker_id}.lock")


def _remove_live_gauges(directory: str, worker_id: str) -> None:
    for path in glob.glob(os.path.join(glob.escape(directory), f"gauge_live*_{worker_id}.db")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def claim_worker_id(directory: str, worker_id: str, timeout: float = CLAIM_TIMEOUT) -> int:
    """Take ``worker-<id>.lock`` for the calling process and delete the live gauge files
    a dead predecessor with the same id left. Returns the lock descriptor: keep it open
    for the life of the process (closing it releases the id).

    Raises :class:`StatsError` when another live process holds the id (two processes
    writing the same files would lose updates) and OSError when the directory is unusable.
    """
    _check_worker_id(worker_id)
    fd = os.open(_lock_path(directory, worker_id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise StatsError(
                    f"metrics worker id {worker_id} is in use by another live process"
                ) from None
            time.sleep(0.005)
    _remove_live_gauges(directory, worker_id)
    return fd


def reap_dead_workers(directory: str) -> list[str]:
    """Delete the live gauge files of every worker id whose process is gone; return
    those ids. Called by the exporter before it reads the files for a scrape.

    A worker is alive while it holds its lock; the files of a dead one are deleted while
    this function holds the lock, so a replacement starting at that moment waits and
    cannot lose the files it is about to create.
    """
    ids: set[str] = set()
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            match = _LIVE_GAUGE_RE.match(name)
            if match is not None:
                ids.add(match.group(1))
    reaped = []
    for worker_id in sorted(ids):
        try:
            fd = os.open(_lock_path(directory, worker_id), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:  # no owner ever held it: orphaned files
            _remove_live_gauges(directory, worker_id)
            reaped.append(worker_id)
            continue
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its worker is alive
            _remove_live_gauges(directory, worker_id)
            reaped.append(worker_id)
        finally:
            os.close(fd)  # releases the lock
    return reaped


# -- the observer ------------------------------------------------------------------------

Value = Any  # prometheus_client.values.MmapedValue (a class made at run time)


class _TelegramValues:
    """The values of one (telegram_ip, dc) pair; traffic values are made on first use
    (like mtg's, a series appears with its first bytes)."""

    __slots__ = ("connections", "dc", "from_client", "ip", "to_client")

    def __init__(self, ip: str, dc: str, connections: Value) -> None:
        self.ip = ip
        self.dc = dc
        self.connections = connections
        self.to_client: Value | None = None
        self.from_client: Value | None = None


class _Stream:
    __slots__ = ("family", "fronting", "telegram")

    def __init__(self, family: str) -> None:
        self.family = family
        self.telegram: _TelegramValues | None = None
        self.fronting = False


class PrometheusObserver:
    """An :data:`~mtgworkers.events.Observer` writing mtg's metrics for one worker process.

    Create it in the worker process (after fork), before the worker emits events. It
    claims ``worker_id`` in ``multiproc_dir`` (see the module docstring) and opens the
    value files; :meth:`close` writes what is pending and releases both. Until
    :meth:`start` is called every change is written at once; after it, changes are
    written once a second from a timer on the worker's loop. Raises :class:`StatsError`
    when the id is held by another live process, OSError when the directory is unusable.
    """

    def __init__(self, metric_prefix: str, worker_id: int | str, multiproc_dir: str) -> None:
        from prometheus_client import values

        ident = _check_worker_id(str(worker_id))
        self.worker_id = ident
        self.multiproc_dir = multiproc_dir
        self.prefix = metric_prefix
        self._lock_fd: int | None = claim_worker_id(multiproc_dir, ident)
        # prometheus-client finds the directory through the environment when it opens a
        # file (the first value of each type); in a worker this never changes.
        os.environ[MULTIPROC_ENV] = multiproc_dir
        # Our own value class with the worker id as process identifier: no global state
        # of prometheus-client is touched, and nothing made before fork is reused.
        self._value_class = values.MultiProcessValue(process_identifier=lambda: ident)
        self._streams: dict[str, _Stream] = {}
        # Changes not yet written (after start()): value -> amount to add.
        self._pending: dict[Value, float] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._client_connections: dict[str, Value] = {}
        self._fronting_connections: dict[str, Value] = {}
        self._telegram: dict[tuple[str, int], _TelegramValues] = {}
        self._ip_blocklisted: dict[bool, Value] = {}
        self._iplist_size: dict[bool, Value] = {}
        self._accept_refused: dict[str, Value] = {}
        try:
            # mtg's unlabelled counters exist from the start (0 until the first event).
            self._domain_fronting = self._value(DOMAIN_FRONTING)
            self._concurrency_limited = self._value(CONCURRENCY_LIMITED)
            self._replay_attacks = self._value(REPLAY_ATTACKS)
            self._hellos_without_sni = self._value(HELLOS_WITHOUT_SNI)
            self._concurrency_evicted = self._value(CONCURRENCY_EVICTED)
        except BaseException:
            self._value_class.close_all_files()
            os.close(self._lock_fd)
            raise
        self._fronting_traffic: dict[bool, Value] = {}
        self._handlers: dict[type, Callable[[Any], None]] = {
            events.EventStart: self._on_start,
            events.EventConnectedToDC: self._on_connected,
            events.EventDomainFronting: self._on_fronting,
            events.EventTraffic: self._on_traffic,
            events.EventFinish: self._on_finish,
            events.EventConcurrencyLimited: self._on_concurrency_limited,
            events.EventConcurrencyEvicted: self._on_concurrency_evicted,
            events.EventIPBlocklisted: self._on_ip_blocklisted,
            events.EventReplayAttack: self._on_replay_attack,
            events.EventIPListSize: self._on_iplist_size,
            events.EventAcceptRefused: self._on_accept_refused,
            events.EventHelloWithoutSNI: self._on_hello_without_sni,
        }

    def _value(self, spec: MetricSpec, *label_values: str) -> Value:
        name = f"{self.prefix}_{spec.name}"
        sample = name + "_total" if spec.kind == "counter" else name
        return self._value_class(
            spec.kind,
            name,
            sample,
            spec.labels,
            label_values,
            spec.help,
            multiprocess_mode=spec.mode,
        )

    # -- Observer -------------------------------------------------------------------------

    def __call__(self, event: events.Event) -> None:
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """From now on, collect changes in memory and write them every
        :data:`WRITE_EVERY` seconds on ``loop`` (before: every change is written at once)."""
        self._loop = loop
        if self._pending is None:
            self._pending = {}
        if self._timer is None:
            self._timer = loop.call_later(WRITE_EVERY, self._tick)

    def flush(self) -> None:
        """Write the changes collected since the last write into the files."""
        pending = self._pending
        if pending:
            changes = list(pending.items())
            pending.clear()
            for value, amount in changes:
                if amount:
                    value.inc(amount)

    def close(self) -> None:
        """Write what is pending, close the value files, delete this worker's live gauges,
        release the id.

        Counter files stay: their totals belong to the proxy, not to this process.
        """
        if self._lock_fd is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        self._pending = None
        self._value_class.close_all_files()
        _remove_live_gauges(self.multiproc_dir, self.worker_id)
        os.close(self._lock_fd)
        self._lock_fd = None
        self._streams.clear()

    def _tick(self) -> None:
        self.flush()
        if self._loop is not None:
            self._timer = self._loop.call_later(WRITE_EVERY, self._tick)

    def _add(self, value: Value, amount: float) -> None:
        pending = self._pending
        if pending is None:
            value.inc(amount)
        else:
            pending[value] = pending.get(value, 0.0) + amount

    # -- events ---------------------------------------------------------------------------

    def _on_start(self, event: events.EventStart) -> None:
        family = ip_family(event.client_ip)
        self._streams[event.stream_id] = _Stream(family)
        value = self._client_connections.get(family)
        if value is None:
            value = self._client_connections[family] = self._value(CLIENT_CONNECTIONS, family)
        self._add(value, 1)

    def _on_connected(self, event: events.EventConnectedToDC) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.telegram is not None:
            return
        key = (event.remote_ip, event.dc)
        values = self._telegram.get(key)
        if values is None:
            ip, dc = event.remote_ip, str(event.dc)
            values = self._telegram[key] = _TelegramValues(
                ip, dc, self._value(TELEGRAM_CONNECTIONS, ip, dc)
            )
        stream.telegram = values
        self._add(values.connections, 1)

    def _on_fronting(self, event: events.EventDomainFronting) -> None:
        self._add(self._domain_fronting, 1)
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.fronting:
            return
        stream.fronting = True
        value = self._fronting_connections.get(stream.family)
        if value is None:
            value = self._value(DOMAIN_FRONTING_CONNECTIONS, stream.family)
            self._fronting_connections[stream.family] = value
        self._add(value, 1)

    def _on_traffic(self, event: events.EventTraffic) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or event.traffic <= 0:
            return
        telegram = stream.telegram
        if telegram is not None:
            if event.is_read:
                value = telegram.to_client
                if value is None:
                    value = telegram.to_client = self._value(
                        TELEGRAM_TRAFFIC, telegram.ip, telegram.dc, TO_CLIENT
                    )
            else:
                value = telegram.from_client
                if value is None:
                    value = telegram.from_client = self._value(
                        TELEGRAM_TRAFFIC, telegram.ip, telegram.dc, FROM_CLIENT
                    )
            self._add(value, event.traffic)
        elif stream.fronting:
            value = self._fronting_traffic.get(event.is_read)
            if value is None:
                direction = TO_CLIENT if event.is_read else FROM_CLIENT
                value = self._value(DOMAIN_FRONTING_TRAFFIC, direction)
                self._fronting_traffic[event.is_read] = value
            self._add(value, event.traffic)

    def _on_finish(self, event: events.EventFinish) -> None:
        stream = self._streams.pop(event.stream_id, None)
        if stream is None:
            return
        self._add(self._client_connections[stream.family], -1)
        if stream.telegram is not None:
            self._add(stream.telegram.connections, -1)
        if stream.fronting:
            self._add(self._fronting_connections[stream.family], -1)

    def _on_concurrency_limited(self, event: events.EventConcurrencyLimited) -> None:
        self._add(self._concurrency_limited, 1)

    def _on_concurrency_evicted(self, event: events.EventConcurrencyEvicted) -> None:
        self._add(self._concurrency_evicted, 1)

    def _on_ip_blocklisted(self, event: events.EventIPBlocklisted) -> None:
        value = self._ip_blocklisted.get(event.is_blocklist)
        if value is None:
            value = self._value(IP_BLOCKLISTED, _ip_list(event.is_blocklist))
            self._ip_blocklisted[event.is_blocklist] = value
        self._add(value, 1)

    def _on_replay_attack(self, event: events.EventReplayAttack) -> None:
        self._add(self._replay_attacks, 1)

    def _on_iplist_size(self, event: events.EventIPListSize) -> None:
        value = self._iplist_size.get(event.is_blocklist)
        if value is None:
            value = self._value(IPLIST_SIZE, _ip_list(event.is_blocklist))
            self._iplist_size[event.is_blocklist] = value
        # livemostrecent: every worker loads the same list; the newest value wins.
        value.set(float(event.size), timestamp=time.time())

    def _on_hello_without_sni(self, event: events.EventHelloWithoutSNI) -> None:
        self._add(self._hellos_without_sni, 1)

    def _on_accept_refused(self, event: events.EventAcceptRefused) -> None:
        value = self._accept_refused.get(event.reason)
        if value is None:
            value = self._accept_refused[event.reason] = self._value(ACCEPT_REFUSED, event.reason)
        self._add(value, 1)


def _ip_list(is_blocklist: bool) -> str:
    return "blocklist" if is_blocklist else "allowlist"
