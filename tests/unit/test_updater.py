"""mtgworkers.defense.updater: IP lists from files and a loopback HTTP server, failures, refresh."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

import pytest
import uvloop

from mtgworkers.config import IPListConfig
from mtgworkers.defense.iplist import IPList
from mtgworkers.defense.updater import IPListUpdater, is_url
from mtgworkers.net.http import url_fetcher

T = TypeVar("T")

BLOCK_LOGGER = "mtgworkers.blocklist.ipblockist.firehol"
ALLOW_LOGGER = "mtgworkers.allowlist.ipblockist.firehol"


def run(coro: Awaitable[T], timeout: float = 10.0) -> T:
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())  # to_thread's workers
        loop.close()


@contextlib.asynccontextmanager
async def list_server(files: dict[str, bytes]) -> AsyncIterator[tuple[str, list[str]]]:
    """Serves ``files`` by path (404 for anything else); yields (base URL, paths asked)."""
    asked: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            asked.append(path)
            body = files.get(path)
            if body is None:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", asked
    finally:
        server.close()
        await server.wait_closed()


def config(*urls: str, update_each: float = 3600.0) -> IPListConfig:
    return IPListConfig(enabled=True, urls=urls, update_each=update_each)


def warnings_of(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == logger
        and r.levelno == logging.WARNING
        and r.getMessage() == "update has failed"
    ]


FETCH = url_fetcher(timeout=3.0)


def test_files_and_urls_are_merged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    first = tmp_path / "first.netset"
    first.write_text("# FireHOL\n10.0.0.0/8\n192.0.2.1  # one host\n\n")
    second = tmp_path / "second.netset"
    second.write_text("2001:db8::/32\r\n")
    updates: list[IPList] = []

    async def main() -> IPList:
        async with list_server({"/remote.netset": b"198.51.100.0/24\n203.0.113.7\n"}) as (
            base,
            asked,
        ):
            updater = IPListUpdater(
                "blocklist",
                config(str(first), f"{base}/remote.netset", str(second)),
                fetch_url=FETCH,
                on_update=updates.append,
            )
            iplist = await updater.update_once()
            assert asked == ["/remote.netset"]
            assert updater.current is iplist
            return iplist

    iplist = run(main())
    assert updates == [iplist]
    assert len(iplist) == 5
    for ip in ("10.1.2.3", "192.0.2.1", "2001:db8::1", "198.51.100.77", "203.0.113.7"):
        assert ip in iplist
    for ip in ("192.0.2.2", "11.0.0.1", "2001:db9::1", "203.0.113.8"):
        assert ip not in iplist
    info = [r for r in caplog.records if r.name == BLOCK_LOGGER and r.levelno == logging.INFO]
    assert [r.getMessage() for r in info] == ["ip list was updated"]
    assert warnings_of(caplog, BLOCK_LOGGER) == []


def test_failing_url_contributes_nothing_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    good = tmp_path / "good.netset"
    good.write_text("192.0.2.0/24\n")
    updates: list[IPList] = []

    async def main() -> tuple[str, IPList]:
        async with list_server({}) as (base, _):
            updater = IPListUpdater(
                "allowlist",
                config(f"{base}/missing.netset", str(good)),
                fetch_url=FETCH,
                on_update=updates.append,
            )
            return base, await updater.update_once()

    base, iplist = run(main())
    assert len(iplist) == 1 and "192.0.2.9" in iplist
    assert updates == [iplist]
    (warning,) = warnings_of(caplog, ALLOW_LOGGER)
    assert warning.filename_ == f"{base}/missing.netset"  # type: ignore[attr-defined]
    assert warning.error == (  # type: ignore[attr-defined]
        f'Get "{base}/missing.netset": unexpected status code 404'
    )
    # the round still completes
    assert [r.getMessage() for r in caplog.records if r.name == ALLOW_LOGGER][-1] == (
        "ip list was updated"
    )


def test_unreachable_url_and_missing_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    missing = tmp_path / "gone.netset"
    updates: list[IPList] = []
    updater = IPListUpdater(
        "blocklist",
        config("http://user:hunter2@127.0.0.1:9/list", str(missing)),
        fetch_url=url_fetcher(timeout=2.0),
        on_update=updates.append,
    )
    iplist = run(updater.update_once())
    assert len(iplist) == 0
    assert updates == [iplist]  # an all-failed round still swaps in (an empty list), as mtg
    by_name = {r.filename_: r.error for r in warnings_of(caplog, BLOCK_LOGGER)}  # type: ignore[attr-defined]
    assert set(by_name) == {"http://user:xxxxx@127.0.0.1:9/list", str(missing)}
    assert "hunter2" not in repr([r.__dict__ for r in caplog.records])
    assert by_name[str(missing)] == f"cannot read {missing}: no such file or directory"


def test_bad_lines_are_skipped_with_one_warning_per_source(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    broken = tmp_path / "broken.netset"
    broken.write_bytes(
        b"10.0.0.0/8\n# fine\n172.16.0.1\nnot-an-ip\n192.168.0.0/16\nbad too\n198.51.100.1\n"
    )
    other = tmp_path / "other.netset"
    other.write_bytes(b"\xff\xfe comment-less junk\n")

    async def main() -> IPList:
        async with list_server({"/l": b"2001:db8::1\nbad/x\n2001:db8::2\n"}) as (base, _):
            updater = IPListUpdater(
                "blocklist",
                config(str(broken), f"{base}/l", str(other)),
                fetch_url=FETCH,
                on_update=lambda _: None,
            )
            return await updater.update_once()

    iplist = run(main())
    assert len(iplist) == 6
    listed = ("10.9.9.9", "172.16.0.1", "192.168.1.1", "198.51.100.1", "2001:db8::1", "2001:db8::2")
    assert all(ip in iplist for ip in listed)
    assert warnings_of(caplog, BLOCK_LOGGER) == []  # the round did not fail
    skipped = [
        r
        for r in caplog.records
        if r.name == BLOCK_LOGGER and r.getMessage() == "ip list has bad lines; they were skipped"
    ]
    assert all(r.levelno == logging.WARNING for r in skipped)
    by_source = {r.filename_.rsplit("/", 1)[-1]: r.__dict__ for r in skipped}  # type: ignore[attr-defined]
    assert len(skipped) == len(by_source) == 3  # once per source, not once per line
    assert by_source["broken.netset"]["bad_lines"] == 2
    assert by_source["broken.netset"]["first_bad_line"] == 4
    assert by_source["broken.netset"]["error"] == (
        "line 4: cannot parse 'not-an-ip' as an IP address or CIDR"
    )
    assert by_source["l"]["bad_lines"] == 1
    assert by_source["l"]["error"] == "line 2: cannot parse 'bad/x' as an IP address or CIDR"
    assert by_source["other.netset"]["error"].startswith("line 1: cannot parse")


def test_sources_are_read_in_parallel() -> None:
    started: list[str] = []
    both_started = asyncio.Event()

    async def fetch(url: str) -> bytes:
        started.append(url)
        if len(started) == 2:
            both_started.set()
        # A sequential reader would wait here forever (until the test's time bound).
        await both_started.wait()
        return b"192.0.2.%d\n" % len(url)

    updater = IPListUpdater(
        "blocklist",
        config("http://a.invalid/x", "https://b.invalid/yy"),
        fetch_url=fetch,
        on_update=lambda _: None,
    )
    iplist = run(updater.update_once(), timeout=5.0)
    assert sorted(started) == ["http://a.invalid/x", "https://b.invalid/yy"]
    assert len(iplist) == 2


def test_periodic_refresh_picks_up_changes(tmp_path: Path) -> None:
    source = tmp_path / "list.netset"
    source.write_text("192.0.2.1\n")

    async def main() -> None:
        updates: asyncio.Queue[IPList] = asyncio.Queue()
        updater = IPListUpdater(
            "allowlist",
            config(str(source), update_each=0.01),
            fetch_url=FETCH,
            on_update=updates.put_nowait,
        )
        task = asyncio.create_task(updater.run())
        first = await updates.get()
        assert "192.0.2.1" in first and "192.0.2.2" not in first
        source.write_text("192.0.2.2\n")
        # Rounds keep coming; wait for one that read the new content.
        while True:
            later = await updates.get()
            if "192.0.2.2" in later:
                break
        assert "192.0.2.1" not in later
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    run(main())


def test_run_survives_a_failing_on_update(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        delivered: asyncio.Queue[IPList] = asyncio.Queue()
        calls = 0

        def on_update(iplist: IPList) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("observer broke")
            delivered.put_nowait(iplist)

        async def fetch(url: str) -> bytes:
            return b"192.0.2.1\n"

        updater = IPListUpdater(
            "blocklist",
            config("http://x.invalid/", update_each=0.01),
            fetch_url=fetch,
            on_update=on_update,
        )
        task = asyncio.create_task(updater.run())
        second = await delivered.get()
        assert "192.0.2.1" in second
        assert calls >= 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    errors = [r for r in caplog.records if r.name == BLOCK_LOGGER and r.levelno == logging.ERROR]
    assert errors and errors[0].error == "observer broke"  # type: ignore[attr-defined]


def test_names_and_sources() -> None:
    with pytest.raises(ValueError, match="blocklist, allowlist"):
        IPListUpdater("denylist", config(), fetch_url=FETCH, on_update=lambda _: None)
    assert is_url("http://h/x") and is_url("HTTPS://h/x")
    assert not is_url("/etc/list.netset") and not is_url("relative/list")
    # no sources: an empty list, still delivered
    updates: list[IPList] = []
    updater = IPListUpdater("allowlist", config(), fetch_url=FETCH, on_update=updates.append)
    iplist = run(updater.update_once())
    assert len(iplist) == 0 and updates == [iplist]
