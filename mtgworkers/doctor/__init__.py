"""``mtgworkers doctor``: check that the proxy can run correctly on this host.

The sections and texts of ``mtg doctor`` (docs/mtg-compat.md (e)), in mtg's order, then ours:

1. Deprecated options            mtg's list and advice
2. Time skewness                 several NTP servers with retries (mtg: one, once)
3. Validate native network connectivity, then the same through every SOCKS5 proxy
4. Validate fronting domain connectivity   a verified TLS handshake (mtg: a TCP connect)
5. Validate SNI-DNS match        every detected IP family must match (mtg run's rule)
6. Validate host limits          open files, somaxconn, tcp_migrate_req (new)
7. Probe the running proxy       client and censor probes (new; when the proxy answers)

All sections run concurrently and each is bounded; the whole run has a deadline. The
exit code is mtg's: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import mmap
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mtgworkers.defense.doppel import SharedState
from mtgworkers.doctor.checks import (
    Context,
    check_dc_connectivity,
    check_deprecated,
    check_fronting,
    check_host_limits,
    check_sni_dns,
    check_time,
)
from mtgworkers.doctor.probe import check_probe, probe_target
from mtgworkers.doctor.report import Check, Report, Section, Status
from mtgworkers.netaddr import join_host_port
from mtgworkers.proc import segment_files

if TYPE_CHECKING:
    from mtgworkers.config import Config

__all__ = [
    "DEFAULT_DEADLINE",
    "Check",
    "Options",
    "Report",
    "Section",
    "Status",
    "parse_ntp_servers",
    "parse_probe_address",
    "run",
]

DEFAULT_DEADLINE = 60.0


@dataclass(frozen=True)
class Options:
    """Command-line settings; empty/None values fall back to ``[doctor]`` in the config.

    ``probe``: True = probe the proxy and fail if it does not answer; False = never
    probe; None = probe when it answers. ``probe_address``: where to probe (default: the
    config's bind-to, unspecified addresses mapped to loopback).
    """

    ntp_servers: tuple[tuple[str, int], ...] = ()
    ip_echo_urls: tuple[str, ...] = ()
    ca_file: str | None = None
    timeout: float | None = None
    deadline: float = DEFAULT_DEADLINE
    probe: bool | None = None
    probe_address: tuple[str, int] | None = None


_Step = Callable[[Context, Section], Awaitable[None]]


def _sections(config: Config, options: Options) -> list[tuple[Section, _Step]]:
    steps: list[tuple[Section, _Step]] = [
        (Section("deprecated-options", "Deprecated options"), check_deprecated),
        (Section("time-skewness", "Time skewness"), check_time),
        (
            Section("native-network", "Validate native network connectivity"),
            check_dc_connectivity,
        ),
    ]
    for index, proxy in enumerate(config.network.proxies):
        # str(proxy) never shows the password (mtg prints it).
        title = f"Validate network connectivity with proxy {proxy}"
        steps.append((Section(f"proxy-network-{index + 1}", title), _bind_proxy(index)))
    steps += [
        (Section("fronting-domain", "Validate fronting domain connectivity"), check_fronting),
        (Section("sni-dns", "Validate SNI-DNS match"), check_sni_dns),
        (Section("host-limits", "Validate host limits"), check_host_limits),
    ]
    if options.probe is not False:
        target = options.probe_address or probe_target(config.bind_to.host, config.bind_to.port)
        shown = join_host_port(*target)

        async def probe(ctx: Context, section: Section) -> None:
            await check_probe(ctx, section, target, required=bool(options.probe))

        steps.append((Section("probe", f"Probe the running proxy on {shown}"), probe))
    return steps


def _bind_proxy(index: int) -> _Step:
    async def step(ctx: Context, section: Section) -> None:
        await check_dc_connectivity(ctx, section, ctx.config.network.proxies[index])

    return step


async def run(config: Config, options: Options | None = None) -> Report:
    """Run every section against ``config`` and return the report.

    Sections run concurrently; whatever has not finished after ``options.deadline``
    seconds is cancelled and gets an error line. Raises OSError/ssl.SSLError only when the
    CA file cannot be loaded (before anything runs).
    """
    options = options or Options()
    ctx = Context.create(
        config,
        timeout=options.timeout,
        ntp_servers=options.ntp_servers,
        ip_echo_urls=options.ip_echo_urls,
        ca_file=options.ca_file,
    )
    steps = _sections(config, options)
    started = time.monotonic()
    tasks = [asyncio.ensure_future(_guarded(step, ctx, section)) for section, step in steps]
    _, pending = await asyncio.wait(tasks, timeout=options.deadline)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    for (section, _), task in zip(steps, tasks, strict=True):
        if task in pending:
            section.add(
                Status.ERROR,
                f"did not finish within doctor's deadline ({options.deadline:g}s)",
                seconds=time.monotonic() - started,
            )
    return Report([section for section, _ in steps], doppelganger=running_doppelganger())


def running_doppelganger(directory: str | None = None) -> dict[str, Any] | None:
    """What the doppelganger of the proxies running on this host learned, for ``--json``:
    ``{"<supervisor pid>": {k, lambda_ms, mean_gap_ms, noise_mean, ...}}``; None when no
    proxy runs here. A state this user may not read is reported with its error."""
    found: dict[str, Any] = {}
    now = time.time()
    for pid, path in segment_files("doppel", directory):
        try:
            with (
                open(path, "rb") as stream,
                mmap.mmap(stream.fileno(), 0, prot=mmap.PROT_READ) as mapped,
            ):
                found[str(pid)] = SharedState(mapped).snapshot().as_json(now)
        except (OSError, ValueError) as exc:
            found[str(pid)] = {"error": str(exc)}
    return found or None


async def _guarded(step: _Step, ctx: Context, section: Section) -> None:
    try:
        await step(ctx, section)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug in one check must not hide the others
        section.add(Status.ERROR, f"check failed: {type(exc).__name__}: {exc}")


def parse_probe_address(text: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` for ``--probe-address``. Raises ValueError."""
    from mtgworkers.config import ConfigError, parse_dc_address

    try:
        return parse_dc_address(text)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def parse_ntp_servers(values: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """``--ntp-server`` values. Raises ValueError."""
    from mtgworkers.config import ConfigError, parse_ntp_server

    try:
        return tuple(parse_ntp_server(value) for value in values)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
