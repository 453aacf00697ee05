"""One worker process: listening sockets, admission state, timers, and the uvloop loop.

Everything here is per process and built from the frozen :class:`~mtgworkers.config.Config`:
no module-level state, so the supervisor can run N of these. The pieces that must be
shared between workers are injected: the anti-replay filter works over any buffer (a
``bytearray`` here, shared memory under the supervisor) and the concurrency limiter is an
object with ``try_acquire``/``release`` (:class:`~mtgworkers.admission.Limiter`), wrapped
in the worker's :class:`~mtgworkers.admission.Admission`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import random
import resource
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mtgworkers import events
from mtgworkers.admission import Admission, Limiter
from mtgworkers.dcs import DCTable
from mtgworkers.defense.antireplay import NoopFilter, StableBloomFilter
from mtgworkers.defense.doppel import NoiseParams, SharedState, noise_length
from mtgworkers.defense.iplist import IPList
from mtgworkers.defense.scout import Raider, raid_fetcher
from mtgworkers.defense.shape import ShapeReader, learn_shape
from mtgworkers.defense.updater import IPListUpdater
from mtgworkers.fdguard import AcceptGuard
from mtgworkers.net.dial import Dialer
from mtgworkers.net.dns import Resolver, make_resolver
from mtgworkers.net.http import url_fetcher
from mtgworkers.netaddr import join_host_port
from mtgworkers.pacing import Pacer
from mtgworkers.session import ClientSession
from mtgworkers.telegram_updater import PublicConfigUpdater

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from mtgworkers.config import Config

_log = logging.getLogger("mtgworkers")
_proxy_log = logging.getLogger("mtgworkers.proxy")

# Every session needs two descriptors (client + upstream); keep some for listeners,
# DNS, log files and the event loop itself.
FDS_PER_SESSION = 2
FDS_RESERVED = 64
LISTEN_BACKLOG = 4096


class StartupError(Exception):
    """The worker cannot start; the message says why and what to change."""


class LocalLimiter:
    """A :class:`Limiter` for one process."""

    __slots__ = ("active", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def try_acquire(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        if self.active > 0:
            self.active -= 1


class ReplayFilter(Protocol):
    def test_and_add(self, key: bytes, rnd: int | None = None) -> bool: ...


def raise_nofile_limit(concurrency: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; warn when it is below what
    ``concurrency`` sessions need. Returns the (soft, hard) limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            _log.warning("cannot raise the open files limit", extra={"error": str(exc)})
    needed = concurrency * FDS_PER_SESSION + FDS_RESERVED
    if soft != resource.RLIM_INFINITY and soft < needed:
        _log.warning(
            "open files limit is too low for concurrency: clients will be refused with "
            "'too many open files'; raise LimitNOFILE (systemd) or 'ulimit -n', or lower "
            "concurrency",
            extra={"nofile_limit": soft, "concurrency": concurrency, "needed": needed},
        )
    return soft, hard


def local_addresses() -> set[str]:
    """IP addresses of this host's interfaces (for fronting self-loop detection)."""
    try:
        import psutil

        return {
            addr.address.split("%", 1)[0]
            for addrs in psutil.net_if_addrs().values()
            for addr in addrs
            if addr.family in (socket.AF_INET, socket.AF_INET6)
        }
    except Exception:  # psutil missing or /proc unreadable: loopback checks still work
        return set()


def set_client_keepalive(sock: socket.socket) -> None:
    """mtg's fixed keep-alive for client sockets (idle 30 s, interval 10 s, 3 probes),
    set on the listening socket: Linux copies it to every accepted socket, which saves
    four system calls per client. Phones behind NAT vanish without a FIN; their
    sessions must not pile up."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    except OSError:
        pass  # not fatal: the idle timeout still ends the session


def bind_reuseport(host: str, port: int) -> socket.socket:
    """A bound, not yet listening, non-blocking SO_REUSEPORT TCP socket on ``host:port``
    with the client keep-alive options (accepted sockets inherit them).

    An unspecified IPv6 address (``[::]``) is dual-stack, like Go; any other IPv6
    address is IPv6-only. Raises OSError when the bind fails (the socket is closed).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        set_client_keepalive(sock)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def create_listener(host: str, port: int, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """Create a non-blocking SO_REUSEPORT listening TCP socket on ``host:port``.

    Raises :class:`StartupError` naming the address when the bind fails.
    """
    try:
        sock = bind_reuseport(host, port)
    except OSError as exc:
        raise StartupError(
            f"cannot listen on {join_host_port(host, port)}: {exc.strerror or exc}"
        ) from exc
    try:
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot listen on {join_host_port(host, port)}: {exc.strerror or exc}"
        ) from exc
    return sock


FrontingKey = tuple[tuple[str, int], tuple[str, int]]


def _endpoint(addr: tuple[Any, ...]) -> tuple[str, int]:
    """(ip, port) of a socket address: no IPv6 flow/scope, IPv4-mapped IPv6 as IPv4."""
    ip = addr[0]
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[7:]
    return ip, addr[1]


class Worker:
    """The serving state of one process; sessions reach everything through it."""

    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        *,
        resolver: Resolver,
        dialer: Dialer,
        replay_filter: ReplayFilter,
        limiter: Limiter,
        events: events.EventStream,
        doppel: SharedState | None = None,
        doppel_lock: int | None = None,
        clock: Callable[[], float] = time.time,
        startup_checks: bool = False,
    ) -> None:
        """A worker over its collaborators; :func:`build_worker` makes them from a config.

        ``doppel`` is what the doppelganger learned (shared between workers; default: a
        private state) and ``doppel_lock`` a descriptor that guards claiming a raid.

        startup_checks: run run_startup_checks() in the background once listening. With
        several worker processes the caller enables it in one of them only.
        """
        self.startup_checks = startup_checks
        self.config = config
        self.loop = loop
        self.clock = clock
        # Per-process CSPRNG for handshake randomness (noise, keys, frames, stream ids):
        # an AES-256-CTR keystream under a key from the OS. One getrandom() per worker
        # instead of five per handshake, and ~15x cheaper for the 2.5-4.7 KB of noise.
        # Built after fork, so no two workers share a stream.
        self._rng = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
        self.secret = config.secret
        timeouts = config.network.timeout
        self.handshake_timeout = timeouts.handshake
        self.idle_timeout = timeouts.idle
        self.tolerate_time_skewness = config.tolerate_time_skewness
        self.proxy_protocol_listener = config.proxy_protocol_listener
        trusted = config.proxy_protocol_trusted
        self._proxy_trusted = None if trusted is None else IPList(trusted)
        self.prefer_ip = config.prefer_ip
        self.drs = config.defense.doppelganger.drs
        # one scheduler for every paced connection of this worker (None: pacing off)
        self.pacer = Pacer(loop) if config.defense.doppelganger.pacing else None
        self.doppel = doppel or SharedState.private()
        self._doppel_lock = doppel_lock
        self._noise: NoiseParams | None = None  # calibrated ServerHello noise, if learned
        self._learned_at = -1.0  # loop time the learned values were last read
        self._shape_blob: tuple[bytes, float] = (b"", 0.0)
        # the fronting site's ServerHello shape, decoded when the stored one changes
        self.shape = ShapeReader(lambda: self._shape_blob)
        self._refresh_learned()
        self.allow_fallback_on_unknown_dc = config.allow_fallback_on_unknown_dc
        self.dc_table = DCTable(overrides=config.dc_overrides)
        self.resolver = resolver
        self.dialer = dialer
        self.replay_filter = replay_filter
        self.limiter = limiter
        self.events = events
        # the gate sessions go through: evicts this worker's idle handshakes when full
        self.admission = Admission(limiter, events, loop.time)
        # every live client connection, from connection_made to its end (admitted or not)
        self.sessions: set[ClientSession] = set()
        self.accept_guard = AcceptGuard(loop, self.events, self.sessions)
        self._accepting = 0  # accepted, connection_made not run yet
        self._idle: asyncio.Future[None] | None = None  # resolved when the last session ends
        self._count_accepting = True  # does _idle also wait for connections being accepted
        # (local, remote) ends of our open fronting connections, see fronting_dialled()
        self._fronting_dials: set[FrontingKey] = set()
        fronting = config.domain_fronting
        self.fronting_address = (fronting.host or self.secret.host, fronting.port)
        self.fronting_proxy_protocol = fronting.proxy_protocol
        # mtg: an enabled allowlist rejects everybody until its first update finishes; a
        # disabled one allows all (None = no check).
        self.allowlist: IPList | None = IPList(()) if config.defense.allowlist.enabled else None
        self.blocklist: IPList | None = None
        self._background: list[asyncio.Task[None]] = []
        self.listen_addresses: list[tuple[str, int]] = []
        self._local_ips: set[str] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._tick = max(0.05, min(1.0, self.idle_timeout / 4))
        self._linger = min(self.idle_timeout, 60.0)
        self._flush_every = 5.0
        self._last_flush = 0.0

    # -- start / stop ---------------------------------------------------------------------

    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Listen (on ``sockets`` if given, else on ``bind-to``) and start the timers.

        Raises :class:`StartupError` when the port cannot be bound or when the fronting
        host is this proxy itself.
        """
        if sockets is None:
            bind = self.config.bind_to
            sockets = [create_listener(bind.host, bind.port)]
        for sock in sockets:
            name = sock.getsockname()
            self.listen_addresses.append((name[0], name[1]))
        self._local_ips = local_addresses()
        await self._check_fronting_loop()
        for sock in sockets:
            server = await self.loop.create_server(
                self._new_session, sock=sock, backlog=LISTEN_BACKLOG
            )
            self._servers.append(server)
        self.accept_guard.start()
        self._last_flush = self.loop.time()
        self._sweeper = self.loop.call_later(self._tick, self._sweep)
        self._start_updaters()
        if self.startup_checks:
            # A task, after listening: slow DNS or IP echo services never delay clients.
            self._spawn(self.run_startup_checks())

    async def run_startup_checks(self) -> None:
        """mtg's start-up SNI-DNS check: warn (never fail) when the secret's host name does
        not resolve to this server's public addresses (see mtgworkers.doctor.sni)."""
        from mtgworkers.doctor.sni import startup_check

        await startup_check(self.config, self.resolver)

    def _start_updaters(self) -> None:
        config = self.config
        defense = config.defense
        # Lists and getProxyConfig go through the SOCKS5 proxies, like mtg's HTTP client.
        fetch = url_fetcher(
            timeout=config.network.timeout.http, open_socket=self.dialer.open_socket
        )
        if defense.blocklist.enabled:
            self._spawn(
                IPListUpdater(
                    "blocklist", defense.blocklist, fetch_url=fetch, on_update=self._set_blocklist
                ).run()
            )
        if defense.allowlist.enabled:
            self._spawn(
                IPListUpdater(
                    "allowlist", defense.allowlist, fetch_url=fetch, on_update=self._set_allowlist
                ).run()
            )
        else:  # mtg's static 0.0.0.0/0 + ::/0 list reports size 2
            self.events.send(events.EventIPListSize(2, is_blocklist=False))
        self._raid()
        if config.auto_update:
            self._spawn(
                PublicConfigUpdater(
                    fetch_url=fetch,
                    on_update=lambda family, addrs: self.dc_table.set_auto_addresses(
                        203, family, addrs
                    ),
                ).run()
            )

    def _raid(self) -> None:
        doppelganger = self.config.defense.doppelganger
        if not doppelganger.urls or not self.startup_checks:
            return  # one worker per generation raids; the claim keeps it to one at a time
        fetch = raid_fetcher(self.dialer.open_socket, self.config.network.timeout.http)
        host, port = self.fronting_address

        async def shape() -> bytes | None:
            return await learn_shape(
                host,
                port,
                functools.partial(self.dialer.open_socket, use_proxies=False),
                sni=self.secret.host,
                proxy_protocol=self.fronting_proxy_protocol,
            )

        raider = Raider(
            doppelganger, self.doppel, fetch, lock_fd=self._doppel_lock, learn_shape=shape
        )
        self._spawn(raider.run())

    def _refresh_learned(self) -> None:
        """Take the doppelganger's newest values (a few struct reads; once a second)."""
        learned = self.doppel.snapshot()
        if self.pacer is not None:
            self.pacer.params = learned.weibull
        self._noise = learned.noise
        self._shape_blob = self.doppel.shape()
        self._learned_at = self.loop.time()

    def noise_length(self) -> int | None:
        """Length of the next ServerHello's noise record: around the fronting site's
        measured handshake size once calibrated, else None (the built-in range)."""
        return noise_length(self._noise, random.randrange)

    def _set_blocklist(self, iplist: IPList) -> None:
        self.blocklist = iplist
        self.events.send(events.EventIPListSize(len(iplist), is_blocklist=True))

    def _set_allowlist(self, iplist: IPList) -> None:
        self.allowlist = iplist
        self.events.send(events.EventIPListSize(len(iplist), is_blocklist=False))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._background.append(self.loop.create_task(coro))

    def random_bytes(self, size: int) -> bytes:
        """``size`` bytes from the worker's CSPRNG (see ``__init__``)."""
        return self._rng.update(bytes(size))

    def _new_session(self) -> asyncio.Protocol:
        # Called by the loop when it accepts; connection_made follows a loop turn later.
        if not self.accept_guard.admit():  # out of file descriptors: closed at once
            return self.accept_guard.refusal
        self._accepting += 1
        return ClientSession(self)

    def accepted(self, session: ClientSession) -> None:
        """A session's connection_made ran: it is live until :meth:`finished`."""
        self._accepting -= 1
        self.sessions.add(session)

    def finished(self, session: ClientSession) -> None:
        """A session ended (both transports closed)."""
        self.sessions.discard(session)
        if self._idle is not None and self._is_idle():
            self._idle.set_result(None)
            self._idle = None

    def _is_idle(self) -> bool:
        return not self.sessions and (self._accepting <= 0 or not self._count_accepting)

    async def _sessions_ended(self, timeout: float, *, accepting: bool) -> None:
        """Wait up to ``timeout`` seconds until no session is left; with ``accepting``,
        also none that was accepted but has not reached connection_made yet."""
        self._count_accepting = accepting
        if self._is_idle():
            return
        idle = self._idle = self.loop.create_future()
        try:
            await asyncio.wait_for(idle, timeout)
        except asyncio.TimeoutError:
            self._idle = None

    def stop_accepting(self) -> None:
        """Stop accepting new connections; running sessions go on.

        Closing a listening socket that was handed to us only closes our descriptor:
        when the supervisor keeps its own copy, the accept queue survives for the
        replacement worker.
        """
        for server in self._servers:
            server.close()

    async def drain(self, timeout: float) -> int:
        """Stop accepting, let sessions end by themselves for up to ``timeout`` seconds,
        then cut the rest. Returns how many sessions had to be cut."""
        self.stop_accepting()
        # Connections accepted in the same loop turn as stop_accepting() become sessions
        # only when their connection_made runs: _sessions_ended() waits for those too.
        await self._sessions_ended(timeout, accepting=True)
        remaining = len(self.sessions)
        await self.stop()
        return remaining

    async def stop(self) -> None:
        """Stop accepting and cut every session (mtg's shutdown)."""
        for task in self._background:
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
            self._background.clear()
        for server in self._servers:
            server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for session in list(self.sessions):
            session.shutdown()
        for server in self._servers:
            await server.wait_closed()
        self.accept_guard.close()
        # aborted transports report connection_lost on the next loop iterations: wait for
        # every session to finish (events, limiter release) before the loop goes away
        await self._sessions_ended(1.0, accepting=False)
        if self.pacer is not None:
            self.pacer.close()

    # -- admission ------------------------------------------------------------------------

    def check_ip(self, ip: str) -> str | None:
        """Return "allowlist"/"blocklist" when ``ip`` must be refused, else None."""
        if self.allowlist is not None and ip not in self.allowlist:
            if _proxy_log.isEnabledFor(logging.INFO):
                _proxy_log.info("ip was rejected by allowlist", extra={"ip": ip})
            self.events.send(events.EventIPBlocklisted(ip, is_blocklist=False))
            return "allowlist"
        if self.blocklist is not None and ip in self.blocklist:
            if _proxy_log.isEnabledFor(logging.INFO):
                _proxy_log.info("ip was blacklisted", extra={"ip": ip})
            self.events.send(events.EventIPBlocklisted(ip, is_blocklist=True))
            return "blocklist"
        return None

    def proxy_header_allowed(self, ip: str) -> bool:
        """May a connection from ``ip`` send a PROXY header (proxy-protocol-trusted)?"""
        return self._proxy_trusted is None or ip in self._proxy_trusted

    # -- fronting self-loop detection -----------------------------------------------------

    def is_own_listener(self, addr: tuple[Any, ...]) -> bool:
        """True when ``addr`` (ip, port, ...) is one of our listening sockets."""
        ip, port = addr[0].split("%", 1)[0], addr[1]
        if ip.startswith("::ffff:"):
            ip = ip[7:]
        for listen_ip, listen_port in self.listen_addresses:
            if port != listen_port:
                continue
            if ip == listen_ip:
                return True
            if listen_ip in ("0.0.0.0", "::") and (self._is_local(ip)):
                return True
        return False

    def _is_local(self, ip: str) -> bool:
        try:
            if ipaddress.ip_address(ip).is_loopback:
                return True
        except ValueError:
            return False
        return ip in self._local_ips

    def fronting_dialled(self, local: tuple[Any, ...], peer: tuple[Any, ...]) -> FrontingKey:
        """Remember a connected fronting connection (its socket's local and remote
        addresses) until :meth:`fronting_closed`; returns its key, the 4-tuple."""
        key = (_endpoint(local), _endpoint(peer))
        self._fronting_dials.add(key)
        return key

    def fronting_closed(self, key: FrontingKey) -> None:
        self._fronting_dials.discard(key)

    def is_own_fronting_connection(
        self, peer: tuple[Any, ...] | None, local: tuple[Any, ...] | None
    ) -> bool:
        """True when an accepted connection is one of our own fronting dials come back.

        Both ends must mirror the dial: Linux hands out one ephemeral port for connections
        to different destinations, so a client's (ip, port) alone often equals the local
        end of an unrelated fronting connection (a site on 127.0.0.1, clients through a
        local HAProxy). A loop through NAT changes an end and is not recognised here.
        """
        if not self._fronting_dials or peer is None or local is None:
            return False
        return (_endpoint(peer), _endpoint(local)) in self._fronting_dials

    async def _check_fronting_loop(self) -> None:
        host, port = self.fronting_address
        try:
            addresses = await asyncio.wait_for(self.resolver.resolve(host), 10.0)
        except (OSError, asyncio.TimeoutError) as exc:
            _log.warning(
                "cannot resolve the fronting host at start; will retry per connection",
                extra={"hostname": host, "error": str(exc)},
            )
            return
        for ip in addresses:
            if self.is_own_listener((ip, port)):
                raise StartupError(
                    f"domain fronting to {join_host_port(host, port)} would loop: "
                    f"{join_host_port(ip, port)} is this "
                    "proxy's own listening address. Set [domain-fronting] ip/port to the real "
                    "website (for example a web server on another port of this host)"
                )

    # -- timers ---------------------------------------------------------------------------

    def _sweep(self) -> None:
        loop = self.loop
        now = loop.time()
        idle, linger = self.idle_timeout, self._linger
        flush = now - self._last_flush >= self._flush_every
        if flush:
            self._last_flush = now
        for session in list(self.sessions):
            try:
                session.tick(now, idle, linger, flush)
            except Exception as exc:  # a session bug must never stop the sweeper
                _log.error("session tick failed", extra={"error": repr(exc)}, exc_info=exc)
        self.admission.tick(now)
        if now - self._learned_at >= 1.0:
            self._refresh_learned()
        self._sweeper = loop.call_later(self._tick, self._sweep)


def build_worker(
    config: Config,
    loop: asyncio.AbstractEventLoop,
    *,
    metrics_id: int | str,
    replay_filter: ReplayFilter | None = None,
    limiter: Limiter | None = None,
    doppel: SharedState | None = None,
    doppel_lock: int | None = None,
    clock: Callable[[], float] = time.time,
    startup_checks: bool = False,
) -> tuple[Worker, Callable[[], None]]:
    """The one way to make a serving :class:`Worker` from a config: the supervisor's
    workers, simple-run (through the supervisor) and the tests all boot through here.

    Builds the collaborators the config describes: resolver, dialer, event stream and the
    metrics observers ``[stats.prometheus]``/``[stats.statsd]`` enable. What is shared
    between worker processes is passed in: ``replay_filter`` (default: a private filter
    per ``[defense.anti-replay]``) and ``limiter`` (default: a private ``concurrency``
    gate), and ``doppel`` with ``doppel_lock`` (default: a private state, see
    :class:`Worker`). Call it in the worker process (after fork) and before
    ``worker.start()``.

    ``metrics_id`` names this process's Prometheus files and must be unique among the
    worker processes alive at the same time; a replacement of a dead worker should reuse
    it so that counters continue from its totals (under the supervisor: the scoreboard
    cell). Prometheus needs ``PROMETHEUS_MULTIPROC_DIR``, set by whoever runs the exporter.

    Returns the worker and a function that flushes and detaches the observers: call it
    after ``worker.stop()``/``worker.drain()`` so the sessions' last traffic is counted.
    Raises :class:`mtgworkers.stats.StatsError` when an enabled observer cannot be set up.
    """
    from mtgworkers import stats

    if replay_filter is None:
        anti_replay = config.defense.anti_replay
        if anti_replay.enabled:
            buf = bytearray(StableBloomFilter.buffer_size(anti_replay.max_size))
            replay_filter = StableBloomFilter.create(
                buf, anti_replay.max_size, anti_replay.error_rate
            )
        else:
            replay_filter = NoopFilter()
    resolver = make_resolver(config.network.dns)
    stream = events.EventStream(on_error=_observer_failed)
    try:
        observers = stats.make_observers(config, metrics_id)
    except OSError as exc:
        raise stats.StatsError(f"cannot write metrics: {exc}") from exc
    for observer in observers:
        observer.start(loop)
        stream.subscribe(observer)

    def detach() -> None:
        for observer in observers:
            with contextlib.suppress(ValueError):
                stream.unsubscribe(observer)
            observer.close()
        observers.clear()

    worker = Worker(
        config,
        loop,
        resolver=resolver,
        dialer=Dialer(config.network, resolver),
        replay_filter=replay_filter,
        limiter=limiter or LocalLimiter(config.concurrency),
        events=stream,
        doppel=doppel,
        doppel_lock=doppel_lock,
        clock=clock,
        startup_checks=startup_checks,
    )
    return worker, detach


def _observer_failed(exc: BaseException) -> None:
    _log.error("event observer failed", extra={"error": repr(exc)}, exc_info=exc)
