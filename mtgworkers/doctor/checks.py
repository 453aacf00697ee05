"""doctor's sections 1-6: deprecated options, clock, DC connectivity (direct and through
each SOCKS5 proxy), fronting website, SNI-DNS match and host limits.

Each ``check_*`` coroutine fills the :class:`~mtgworkers.doctor.report.Section` it is
given, line by line, so a section cut short by doctor's deadline keeps what it found.
Every network operation is bounded by ``Context.timeout``; nothing raises for network
failures (they become failed lines).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import random
import resource
import socket
import ssl
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mtgworkers.config import format_duration, format_ntp_server
from mtgworkers.config.deprecations import REMOVED_IN, deprecation_message
from mtgworkers.dcs import DCTable
from mtgworkers.defense.shape import ask_server_hello, x25519_share
from mtgworkers.doctor import sni, sntp
from mtgworkers.doctor.report import Section, Status, join_quoted
from mtgworkers.doctor.tlsclient import (
    Observation,
    certificate_summary,
    classify_tls_error,
    tls_handshake,
)
from mtgworkers.net.dial import Dialer
from mtgworkers.net.dns import DOH_ALPN, make_resolver
from mtgworkers.netaddr import join_host_port
from mtgworkers.protocol import proxyproto
from mtgworkers.protocol import serverhello as sh
from mtgworkers.server import FDS_PER_SESSION, FDS_RESERVED, LISTEN_BACKLOG, local_addresses

if TYPE_CHECKING:
    from mtgworkers.config import Config, Network, ProxyURL
    from mtgworkers.net.dns import Resolver

__all__ = [
    "DC_NUMBERS",
    "Context",
    "check_dc_connectivity",
    "check_deprecated",
    "check_fronting",
    "check_host_limits",
    "check_sni_dns",
    "check_time",
    "fronting_address",
    "verifying_context",
]

DC_NUMBERS = (1, 2, 3, 4, 5, 203)
NTP_ATTEMPTS = 3
# mtg's bands (docs/mtg-compat.md e.2): below 30% of the tolerance all good, below 70% a warning.
SKEW_OK = 0.3
SKEW_WARN = 0.7
X509_HOSTNAME_MISMATCH = 62
# Where the kernel settings are read (a module attribute so tests can point it elsewhere).
PROC = "/proc"


def verifying_context(
    ca_file: str | None, alpn: Sequence[str] = ("h2", "http/1.1")
) -> ssl.SSLContext:
    """A client TLS context: the system trust store plus ``ca_file`` (PEM), host names
    checked, offering ``alpn``. Raises OSError/ssl.SSLError for an unusable CA file."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


class _Unshuffled(random.Random):
    # doctor reports addresses in the table's order, so one run reads like the next.
    def shuffle(self, x: Any) -> None:  # type: ignore[override]
        return None


@dataclass
class Context:
    """What every check needs: the config, the resolver, timeouts and TLS trust."""

    config: Config
    timeout: float
    ntp_servers: tuple[tuple[str, int], ...]
    ip_echo_urls: tuple[str, ...]
    ca_file: str | None
    resolver: Resolver
    clock: Callable[[], float] = time.time

    @classmethod
    def create(
        cls,
        config: Config,
        *,
        timeout: float | None = None,
        ntp_servers: Sequence[tuple[str, int]] = (),
        ip_echo_urls: Sequence[str] = (),
        ca_file: str | None = None,
    ) -> Context:
        """Settings from the command line win over ``[doctor]``; ``[network] dns`` gives the
        resolver. Raises OSError/ssl.SSLError when the CA file cannot be loaded."""
        doctor = config.doctor
        timeout = timeout or doctor.timeout
        ca_file = ca_file or doctor.ca_file
        dns_context = None
        dns = config.network.dns
        if ca_file and dns is not None and dns.scheme in ("tls", "https"):
            dns_context = verifying_context(ca_file, DOH_ALPN if dns.scheme == "https" else ())
        if ca_file:
            verifying_context(ca_file)  # fail early, with the file's name, if it is unusable
        resolver = make_resolver(config.network.dns, timeout=timeout, ssl_context=dns_context)
        return cls(
            config=config,
            timeout=timeout,
            ntp_servers=tuple(ntp_servers) or doctor.ntp_servers,
            ip_echo_urls=sni.echo_urls(config, ip_echo_urls),
            ca_file=ca_file,
            resolver=resolver,
        )

    def network(self, proxies: tuple[ProxyURL, ...] = ()) -> Network:
        """``[network]`` with doctor's dial timeout (mtg: tcp or 10 s; ours: tcp or timeout)."""
        net = self.config.network
        timeouts = dataclasses.replace(net.timeout, tcp=net.timeout.tcp or self.timeout)
        return dataclasses.replace(net, proxies=proxies, timeout=timeouts)

    def dialer(self, proxies: tuple[ProxyURL, ...] = ()) -> Dialer:
        return Dialer(self.network(proxies), self.resolver)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms"


# -- 1. deprecated options ---------------------------------------------------------------


def deprecated_message(key: str) -> str:
    """mtg doctor's line for a deprecated key (docs/mtg-compat.md e.1): the start-up warning's
    text with mtg's removal notice."""
    return deprecation_message(key, removed_in=REMOVED_IN)


async def check_deprecated(ctx: Context, section: Section) -> None:
    """One warning per deprecated key that is set, else "All good"."""
    for key in ctx.config.deprecated:
        section.add(Status.WARNING, deprecated_message(key), option=key)
    if not section.checks:
        section.add(Status.OK, "All good")


# -- 2. time skewness --------------------------------------------------------------------


async def _ask_ntp(ctx: Context, host: str, port: int) -> sntp.SNTPResult:
    addresses = await ctx.resolver.resolve(host)
    return await sntp.query(
        addresses[0], port, timeout=ctx.timeout, attempts=NTP_ATTEMPTS, clock=ctx.clock
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return str(exc) or "timeout"
    if isinstance(exc, OSError) and exc.strerror and not str(exc).startswith("cannot"):
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


async def check_time(ctx: Context, section: Section) -> None:
    """Ask every NTP server (with retries); judge the median offset with mtg's bands."""
    names = [format_ntp_server(server) for server in ctx.ntp_servers]
    outcomes = await asyncio.gather(
        *(_ask_ntp(ctx, host, port) for host, port in ctx.ntp_servers), return_exceptions=True
    )
    answers: dict[str, sntp.SNTPResult] = {}
    failures: dict[str, str] = {}
    for name, outcome in zip(names, outcomes, strict=True):
        if isinstance(outcome, sntp.SNTPResult):
            answers[name] = outcome
        elif isinstance(outcome, Exception):
            failures[name] = _reason(outcome)
        else:
            raise outcome
    servers: dict[str, Any] = {
        name: {"offset": result.offset, "delay": result.delay, "stratum": result.stratum}
        for name, result in answers.items()
    }
    servers.update({name: {"error": reason} for name, reason in failures.items()})
    if not answers:
        detail = "; ".join(f"{name}: {reason}" for name, reason in failures.items())
        section.add(
            Status.ERROR,
            f"cannot access ntp pool: no NTP server answered: {detail}",
            servers=servers,
        )
        return
    offset = statistics.median(result.offset for result in answers.values())
    tolerance = ctx.config.tolerate_time_skewness
    ratio = abs(offset) / tolerance
    text = (
        f"Time drift is {format_duration(offset)}, but tolerate-time-skewness is "
        f"{format_duration(tolerance)}"
    )
    figures = {"offset": offset, "tolerance": tolerance, "ratio": ratio, "servers": servers}
    if ratio < SKEW_OK:
        section.add(Status.OK, text, **figures)
    elif ratio < SKEW_WARN:
        section.add(Status.WARNING, text + ". Please check ntp.", **figures)
    else:
        section.add(Status.FAILURE, text + ". You will get many rejected connections!", **figures)
    for name, reason in failures.items():
        section.add(Status.INFO, f"no answer from NTP server {name}: {reason}", server=name)


# -- 3. DC connectivity ------------------------------------------------------------------


async def _dial_dc(
    ctx: Context, dialer: Dialer, dc: int, use_proxies: bool
) -> tuple[Status, str, dict[str, Any]]:
    table = DCTable(overrides=ctx.config.dc_overrides)
    addresses = table.addresses(dc, ctx.config.prefer_ip, rng=_Unshuffled())
    if not addresses:
        return Status.FAILURE, f"DC {dc}: no suitable addresses after IP version filtering", {}
    errors: list[str] = []
    for host, port in addresses:
        started = time.monotonic()
        try:
            sock = await asyncio.wait_for(
                dialer.open_socket(host, port, use_proxies=use_proxies), ctx.timeout * 2
            )
        except (OSError, asyncio.TimeoutError) as exc:
            errors.append(
                _reason(exc) if str(exc) else f"cannot dial to {join_host_port(host, port)}"
            )
            continue
        sock.close()
        elapsed = time.monotonic() - started
        figures = {"address": join_host_port(host, port), "seconds": elapsed, "failed": errors}
        return Status.OK, f"DC {dc} ({join_host_port(host, port)}, {_ms(elapsed)})", figures
    return Status.FAILURE, f"DC {dc}: {errors[-1]}", {"errors": errors}


async def check_dc_connectivity(
    ctx: Context, section: Section, proxy: ProxyURL | None = None
) -> None:
    """TCP connect to every DC (1-5, 203), directly or through ``proxy`` only.

    Addresses come from the built-in table or ``[dc-overrides]``, ordered and filtered by
    ``prefer-ip``; they are tried one after the other, the first success counts.
    """
    dialer = ctx.dialer(() if proxy is None else (proxy,))
    results = await asyncio.gather(
        *(_dial_dc(ctx, dialer, dc, proxy is not None) for dc in DC_NUMBERS)
    )
    for dc, (status, message, figures) in zip(DC_NUMBERS, results, strict=True):
        section.add(status, message, dc=dc, **figures)


# -- 4. fronting website -----------------------------------------------------------------


def fronting_address(config: Config) -> tuple[str, int]:
    """Where fronted connections go: ``[domain-fronting]`` ip (or the secret's host) and port."""
    return config.domain_fronting.host or config.secret.host, config.domain_fronting.port


async def open_fronting(ctx: Context) -> socket.socket:
    """A TCP connection to the fronting website, as the proxy makes it: direct, through
    the configured resolver, with a PROXY v2 header first when the config says so.
    Raises OSError (DialError) or TimeoutError."""
    host, port = fronting_address(ctx.config)
    sock = await asyncio.wait_for(
        ctx.dialer().open_socket(host, port, use_proxies=False), ctx.timeout * 2
    )
    if ctx.config.domain_fronting.proxy_protocol:
        try:
            local, peer = sock.getsockname(), sock.getpeername()
            header = proxyproto.build_v2((local[0], local[1]), (peer[0], peer[1]))
            await asyncio.get_running_loop().sock_sendall(sock, header)
        except BaseException:
            sock.close()
            raise
    return sock


def _is_this_proxy(config: Config, addresses: Sequence[str], port: int) -> str | None:
    """The first of ``addresses`` that is the proxy's own listener on ``port``, if any."""
    bind = config.bind_to
    if port != bind.port:
        return None
    local = local_addresses()
    for text in addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if text == bind.host or (
            bind.host in ("0.0.0.0", "::") and (address.is_loopback or text in local)
        ):
            return text
    return None


async def check_fronting(ctx: Context, section: Section) -> None:
    """Complete a TLS handshake with the fronting website, as a censor's browser would:
    SNI = the secret's host, certificate chain and name verified (system store + CA file).
    """
    config = ctx.config
    host, port = fronting_address(config)
    shown = join_host_port(host, port)
    name = config.secret.host
    try:
        resolved = await ctx.resolver.resolve(host)
    except OSError as exc:
        section.add(Status.FAILURE, f"{shown}: unreachable: {exc}", address=shown)
        return
    loop_ip = await asyncio.to_thread(_is_this_proxy, config, resolved, port)
    if loop_ip is not None:
        section.add(
            Status.FAILURE,
            f"{shown}: fronting would loop: {join_host_port(loop_ip, port)} is this proxy's own "
            "listening address; set [domain-fronting] ip/port to the real website",
            address=shown,
        )
        return
    try:
        sock = await open_fronting(ctx)
    except (OSError, asyncio.TimeoutError) as exc:
        section.add(Status.FAILURE, f"{shown}: unreachable: {_reason(exc)}", address=shown)
        return
    try:
        context = verifying_context(ctx.ca_file)
        result = await tls_handshake(sock, context, name, ctx.timeout)
    except (OSError, asyncio.TimeoutError, EOFError) as exc:
        section.add(Status.FAILURE, _fronting_failure(shown, name, exc, ctx.timeout), address=shown)
        return
    finally:
        sock.close()
    _, _, details = certificate_summary(result.certificate)
    section.add(
        Status.OK,
        f"{shown} is reachable: {result.version}, ALPN {result.alpn or 'none'}, certificate "
        f"for {name} issued by {details.get('issuer', '?')} valid until "
        f"{details.get('not_after', '?')[:10]} ({_ms(result.seconds)})",
        address=shown,
        tls_version=result.version,
        alpn=result.alpn,
        certificate=details,
        seconds=result.seconds,
    )
    _check_alpn(section, shown, result.version, result.alpn)
    await _check_post_quantum(ctx, section, shown)


# What a big site looks like in 2026 (doctor's "signals"): TLS 1.3 with HTTP/2, and the
# hybrid post-quantum key exchange X25519MLKEM768 (RFC draft-ietf-tls-ecdhe-mlkem).
PQ_FIX = (
    "pick a fronting domain whose server negotiates X25519MLKEM768 (big sites and CDNs do, "
    "as does any server on OpenSSL 3.5 or later, BoringSSL or Go 1.24 or later)"
)


def _check_alpn(section: Section, shown: str, version: str, alpn: str | None) -> None:
    figures = {"signal": "alpn", "tls_version": version, "alpn": alpn}
    if version == "TLSv1.3" and alpn == "h2":
        section.add(
            Status.OK,
            f"{shown} serves TLS 1.3 with ALPN h2 (HTTP/2), as big sites do",
            **figures,
            expected=True,
        )
        return
    section.add(
        Status.WARNING,
        f"{shown} serves {version} with ALPN {alpn or 'none'} to a client that offers h2: big "
        "sites answer with TLS 1.3 and h2, so a censor probing this proxy sees a site that "
        "looks less like one. Pick a fronting domain that serves HTTP/2 over TLS 1.3",
        **figures,
        expected=False,
    )


async def _check_post_quantum(ctx: Context, section: Section, shown: str) -> None:
    """Offer X25519MLKEM768 first among the groups with only an x25519 key share: a server
    that prefers it answers with a HelloRetryRequest naming it (no ML-KEM maths needed)."""
    hello = sh.probe_client_hello(
        ctx.config.secret.host,
        random=os.urandom(32),
        session_id=os.urandom(32),
        key_shares=[(sh.GROUP_X25519, x25519_share())],
        groups=(sh.GROUP_X25519MLKEM768, sh.GROUP_X25519, 0x0017, 0x0018),
    )
    figures: dict[str, Any] = {"signal": "post-quantum", "group": "X25519MLKEM768"}
    try:
        sock = await open_fronting(ctx)
    except (OSError, asyncio.TimeoutError) as exc:
        section.add(
            Status.ERROR,
            f"{shown}: cannot check X25519MLKEM768: unreachable: {_reason(exc)}",
            **figures,
            negotiates=None,
        )
        return
    try:
        answer, _ = await asyncio.wait_for(ask_server_hello(sock, hello), ctx.timeout)
    except (OSError, asyncio.TimeoutError, sh.ServerHelloError) as exc:
        if isinstance(exc, sh.ServerHelloError):
            why = str(exc)
        elif isinstance(exc, asyncio.TimeoutError):
            why = f"no ServerHello within {ctx.timeout:g}s"
        else:
            why = _reason(exc)
        status = Status.WARNING if isinstance(exc, sh.AlertReceived) else Status.ERROR
        section.add(
            status,
            f"{shown}: cannot tell whether it negotiates X25519MLKEM768: {why}",
            **figures,
            negotiates=None,
        )
        return
    finally:
        sock.close()
    chose = sh.group_name(answer.group) if answer.group else "no key share"
    if answer.retry and answer.group == sh.GROUP_X25519MLKEM768:
        section.add(
            Status.OK,
            f"{shown} negotiates post-quantum X25519MLKEM768, as big sites do (offered "
            "without its key share, it asked for it with a HelloRetryRequest)",
            **figures,
            negotiates=True,
            answer="hello_retry_request",
        )
        return
    if answer.version != sh.TLS13:
        how = f"answers TLS version {answer.version:#06x} (not TLS 1.3)"
    elif answer.retry:
        how = f"asks for {chose} instead"
    else:
        how = f"chose {chose} at once"
    section.add(
        Status.WARNING,
        f"{shown} does not negotiate post-quantum X25519MLKEM768: offered first, it {how}. "
        "Censors were reported in June 2026 to use this as a signal: big real sites negotiate "
        f"X25519MLKEM768, and a site that does not looks less like one. Fix: {PQ_FIX}",
        **figures,
        negotiates=False,
        answer="hello_retry_request" if answer.retry else "server_hello",
        chosen=chose,
    )


def _fronting_failure(shown: str, name: str, exc: BaseException, timeout: float) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code == X509_HOSTNAME_MISMATCH:
            return f"{shown}: name mismatch: the certificate is not valid for {name}"
        return f"{shown}: bad certificate: {exc.verify_message}"
    seen: Observation = classify_tls_error(exc, timeout)
    if seen.kind == "alert":
        return f"{shown}: TLS handshake failed: {seen.detail}"
    if seen.kind == "hang":
        return f"{shown}: not TLS: no TLS answer within {timeout:g}s"
    if seen.kind in ("closed", "reset"):
        return f"{shown}: not TLS: {seen.detail} during the TLS handshake"
    return f"{shown}: {seen.detail}"


# -- 5. SNI-DNS match --------------------------------------------------------------------


def _strip_prefix(message: str, host: str) -> str:
    prefix = f"cannot resolve {host}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


async def check_sni_dns(ctx: Context, section: Section) -> None:
    """The secret's host must resolve (A and AAAA, configured resolver) to our public
    address of every family we have one for (mtg's run-time rule, stricter than mtg's
    doctor, which is content with one family)."""
    config = ctx.config
    host = config.secret.host
    try:
        resolved = await ctx.resolver.resolve(host)
    except OSError as exc:
        section.add(
            Status.ERROR,
            f"cannot resolve DNS name of {host}: {_strip_prefix(str(exc), host)}",
            hostname=host,
        )
        return
    context = verifying_context(ctx.ca_file, ()) if ctx.ca_file else None
    ours = await sni.public_addresses(
        config.public_ipv4, config.public_ipv6, ctx.ip_echo_urls, ctx.timeout, ssl_context=context
    )
    figures = {
        "hostname": host,
        "resolved": list(resolved),
        "public_ipv4": ours.ipv4,
        "public_ipv6": ours.ipv6,
        "public_ipv4_source": ours.ipv4_source,
        "public_ipv6_source": ours.ipv6_source,
    }
    if ours.ipv4 is None and ours.ipv6 is None:
        section.add(
            Status.ERROR,
            "cannot detect public IP address: cannot detect automatically and "
            "public-ipv4/public-ipv6 are not set in config",
            **figures,
        )
        return
    if not resolved:
        section.add(Status.FAILURE, f"Hostname {host} cannot be resolved to any host", **figures)
        return
    matches = sni.family_matches(resolved, ours)
    for label, ip, match in (("IPv4", ours.ipv4, matches[0]), ("IPv6", ours.ipv6, matches[1])):
        if ip is None:
            section.add(
                Status.INFO,
                f"no public {label} address (not in config, not detected): {label} not checked",
                **figures,
            )
        elif match:
            section.add(Status.OK, f"IP address {ip} matches secret hostname {host}", **figures)
        else:
            section.add(
                Status.FAILURE,
                f"Hostname {host} is resolved to {join_quoted(resolved)} addresses, not {ip}",
                **figures,
            )


# -- 6. host limits ----------------------------------------------------------------------


def _read_int(path: str) -> int | None:
    try:
        with open(path) as stream:
            return int(stream.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _listener_pids(port: int) -> list[int]:
    """PIDs of processes with a TCP socket listening on ``port`` (those we may see)."""
    try:
        import psutil

        return sorted(
            {
                conn.pid
                for conn in psutil.net_connections(kind="tcp")
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr[1] == port
                if conn.pid
            }
        )
    except Exception:  # no permission, no psutil: the running proxy is just not checked
        return []


def _nofile_of(pid: int) -> int | None:
    try:
        import psutil

        soft, _ = psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)
        return int(soft)
    except Exception:
        return None


async def check_host_limits(
    ctx: Context,
    section: Section,
    *,
    proc: str | None = None,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    listener_pids: Callable[[int], list[int]] = _listener_pids,
    nofile_of: Callable[[int], int | None] = _nofile_of,
) -> None:
    """Open files limit vs concurrency, somaxconn vs the listen backlog, tcp_migrate_req.

    ``proc`` (default :data:`PROC`) and the callables are for tests (a fake /proc, fixed
    limits, no process table).
    """
    proc = proc or PROC
    concurrency = ctx.config.concurrency
    needed = concurrency * FDS_PER_SESSION + FDS_RESERVED
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    limit = hard  # the proxy raises its soft limit to the hard one at start
    shown = "unlimited" if limit == resource.RLIM_INFINITY else str(limit)
    figures = {"soft": soft, "hard": hard, "needed": needed, "concurrency": concurrency}
    if limit == resource.RLIM_INFINITY or limit >= needed:
        section.add(
            Status.OK,
            f"open files limit {shown} (hard limit of this shell; the proxy raises its soft "
            f"limit to it) covers concurrency {concurrency}: {needed} needed "
            f"({FDS_PER_SESSION} per session + {FDS_RESERVED})",
            **figures,
        )
    else:
        section.add(
            Status.FAILURE,
            f"open files limit {shown} is below the {needed} needed for concurrency "
            f"{concurrency} ({FDS_PER_SESSION} per session + {FDS_RESERVED}): clients will be "
            "refused with 'too many open files'. Fix: raise LimitNOFILE= in the systemd unit "
            "(or 'ulimit -n' where the proxy starts), or lower concurrency",
            **figures,
        )
    # psutil walks /proc: a thread, so the other checks keep running meanwhile.
    pids = await asyncio.to_thread(listener_pids, ctx.config.bind_to.port)
    for pid in pids:
        running = nofile_of(pid)
        if running is None or running == resource.RLIM_INFINITY:
            continue
        status = Status.OK if running >= needed else Status.FAILURE
        advice = "" if status is Status.OK else ": raise LimitNOFILE= and restart the proxy"
        section.add(
            status,
            f"the process listening on port {ctx.config.bind_to.port} (pid {pid}) has an open "
            f"files limit of {running}, {needed} needed{advice}",
            pid=pid,
            nofile=running,
            needed=needed,
        )

    somaxconn = _read_int(os.path.join(proc, "sys/net/core/somaxconn"))
    if somaxconn is None:
        section.add(Status.INFO, "cannot read net.core.somaxconn (not Linux?)")
    elif somaxconn < LISTEN_BACKLOG:
        section.add(
            Status.WARNING,
            f"net.core.somaxconn is {somaxconn}, below the listen backlog {LISTEN_BACKLOG}: "
            "the kernel shortens the accept queue and drops connections in bursts. Fix: "
            f"sysctl -w net.core.somaxconn={LISTEN_BACKLOG} (persist it in /etc/sysctl.d/)",
            somaxconn=somaxconn,
            backlog=LISTEN_BACKLOG,
        )
    else:
        section.add(
            Status.OK,
            f"net.core.somaxconn is {somaxconn} (listen backlog {LISTEN_BACKLOG})",
            somaxconn=somaxconn,
            backlog=LISTEN_BACKLOG,
        )

    migrate = _read_int(os.path.join(proc, "sys/net/ipv4/tcp_migrate_req"))
    if migrate is None:
        section.add(
            Status.INFO,
            "net.ipv4.tcp_migrate_req is not available (Linux < 5.14): connections waiting "
            "on a removed worker slot are reset (reloads keep their sockets and are safe)",
        )
    elif migrate:
        section.add(
            Status.OK,
            f"net.ipv4.tcp_migrate_req is {migrate}: a removed worker slot hands its waiting "
            "connections to the other workers",
            tcp_migrate_req=migrate,
        )
    else:
        # Advisory: reloads and restarts keep each slot's socket; only removing a slot
        # (SIGTTOU, a reload to fewer workers) drops its queue.
        section.add(
            Status.INFO,
            "net.ipv4.tcp_migrate_req is 0: when a worker slot is removed (SIGTTOU, reload to "
            "fewer workers) the connections waiting in its queue are reset. Fix: sysctl -w "
            "net.ipv4.tcp_migrate_req=1 (persist it in /etc/sysctl.d/) before the proxy starts",
            tcp_migrate_req=migrate,
        )


def close_quietly(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.close()
