"""The start-up SNI-DNS check of ``run`` (docs/mtg-compat.md d.3): messages, fields, the hook."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop

from mtgworkers import logs
from mtgworkers.doctor import sni
from mtgworkers.net.dns import make_resolver
from mtgworkers.server import build_worker
from tests.doctor.conftest import HOST, KEY, World
from tests.doctor.servers import SNTPResponder, closed_port

MISMATCH = (
    "SNI-DNS mismatch: secret hostname does not resolve to this server's public IP. DPI may "
    "detect and block the proxy. See 'mtgworkers doctor' for details"
)


@pytest.fixture
def records() -> Iterator[io.StringIO]:
    """JSON log lines of the package logger, formatted as the proxy prints them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.MtgJsonFormatter())
    logger = logging.getLogger("mtgworkers")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def lines_of(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def check(world: World, overrides: dict[str, Any] | None = None) -> str:
    config = world.config(overrides)

    async def main() -> str:
        return await sni.startup_check(config, make_resolver(config.network.dns, timeout=2.0))

    return asyncio.run(main())


def test_match_logs_nothing(world: World, records: io.StringIO) -> None:
    assert check(world) == "match"
    assert records.getvalue() == ""


def test_mismatch_has_mtgs_fields(world: World, records: io.StringIO) -> None:
    assert check(world, {"public-ipv4": "127.0.0.2"}) == "mismatch"
    [line] = lines_of(records)
    assert list(line) == [
        "level",
        "logger",
        "timestamp",
        "message",
        "hostname",
        "resolved",
        "public_ip",
        "ipv4_match",
        "ipv6_match",
    ]
    assert line["level"] == "warn" and line["logger"] == ""
    assert line["message"] == MISMATCH
    assert line["hostname"] == HOST
    assert line["resolved"] == "127.0.0.1, ::1"
    assert line["public_ip"] == "127.0.0.2/::1"
    assert (line["ipv4_match"], line["ipv6_match"]) == ("false", "true")


def test_mismatch_with_one_known_family_has_one_match_field(
    world: World, records: io.StringIO
) -> None:
    nowhere = {"ip-echo-urls": [f"http://127.0.0.1:{closed_port()}/"]}
    assert check(world, {"public-ipv4": None, "public-ipv6": "::5", "doctor": nowhere}) == (
        "mismatch"
    )
    [line] = lines_of(records)
    assert line["public_ip"] == "::5" and line["ipv6_match"] == "false"
    assert "ipv4_match" not in line


def test_cannot_resolve(world: World, records: io.StringIO) -> None:
    secret = "ee" + KEY.hex() + b"missing.test".hex()
    assert check(world, {"secret": secret}) == "cannot-resolve"
    [line] = lines_of(records)
    assert line["message"] == "SNI-DNS check: cannot resolve secret hostname"
    assert line["hostname"] == "missing.test"
    assert line["error"] == "cannot resolve missing.test: NXDOMAIN"


def test_cannot_detect(world: World, records: io.StringIO) -> None:
    overrides = {
        "public-ipv4": None,
        "public-ipv6": None,
        "doctor": {"ip-echo-urls": [f"http://127.0.0.1:{closed_port()}/"]},
    }
    assert check(world, overrides) == "cannot-detect"
    [line] = lines_of(records)
    assert line["message"] == (
        "SNI-DNS check: cannot detect public IP address; set public-ipv4/public-ipv6 in config "
        "or run 'mtgworkers doctor'"
    )
    assert set(line) == {"level", "logger", "timestamp", "message"}


def test_detected_address_is_compared(world: World, records: io.StringIO) -> None:
    before = len(world.echo.requests)
    assert check(world, {"public-ipv4": None, "public-ipv6": None}) == "match"
    assert len(world.echo.requests) > before
    assert records.getvalue() == ""


def test_worker_runs_the_check_after_listening_without_delaying_clients(
    world: World, records: io.StringIO
) -> None:
    # A DNS server that never answers: the check hangs in the background while the worker
    # already serves; a mismatch is then logged once the answer comes (here: never).
    silent = world.start(SNTPResponder(silent=True))  # any silent UDP port will do
    slow = world.config({"network": {"dns": f"udp://127.0.0.1:{silent.port}"}})
    loop = uvloop.new_event_loop()
    try:
        worker, _ = build_worker(slow, loop, metrics_id=0, startup_checks=True)
        started = time.monotonic()
        loop.run_until_complete(worker.start())
        assert time.monotonic() - started < 1.0
        host, port = worker.listen_addresses[0]

        async def connect() -> None:
            _reader, writer = await asyncio.open_connection(host, port)
            writer.close()

        loop.run_until_complete(asyncio.wait_for(connect(), 2.0))
        loop.run_until_complete(worker.stop())  # cancels the pending check quietly
    finally:
        loop.close()
    assert records.getvalue() == ""


def test_worker_logs_the_mismatch(world: World, records: io.StringIO) -> None:
    config = world.config({"public-ipv6": "::9"})
    loop = uvloop.new_event_loop()
    try:
        worker, _ = build_worker(config, loop, metrics_id=0, startup_checks=True)
        loop.run_until_complete(worker.start())

        async def wait_for_line() -> None:
            while MISMATCH not in records.getvalue():
                await asyncio.sleep(0.01)

        loop.run_until_complete(asyncio.wait_for(wait_for_line(), 5.0))
        loop.run_until_complete(worker.stop())
    finally:
        loop.close()
    [line] = lines_of(records)
    assert line["ipv4_match"] == "true" and line["ipv6_match"] == "false"


def test_workers_without_the_flag_do_not_check(world: World, records: io.StringIO) -> None:
    config = world.config({"public-ipv6": "::9"})
    loop = uvloop.new_event_loop()
    queries = len(world.dns.queries)
    try:
        worker, _ = build_worker(config, loop, metrics_id=0)
        loop.run_until_complete(worker.start())
        loop.run_until_complete(asyncio.sleep(0.3))
        loop.run_until_complete(worker.stop())
    finally:
        loop.close()
    assert records.getvalue() == ""
    assert (HOST, "AAAA") not in world.dns.queries[queries:]
