"""mtgworkers.telegram_updater: getProxyConfig parsing and the DC 203 updater (loopback only)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from mtgworkers.dcs import DCTable
from mtgworkers.net.http import url_fetcher
from mtgworkers.telegram_updater import (
    DEFAULT_URLS,
    PublicConfigUpdater,
    parse_proxy_config,
)

T = TypeVar("T")

LOGGER = "mtgworkers.proxy.telegram-updaters.public-config"

# The shape of Telegram's answers (addresses made up from documentation ranges).
CONFIG_V4 = """# force_probability 10 10
default 2;
proxy_for 1 192.0.2.50:8888;
proxy_for -1 192.0.2.51:8888;
proxy_for 2 198.51.100.51:80;
proxy_for 203 203.0.113.100:8888;
proxy_for 203 203.0.113.101:8888;
  proxy_for   203   203.0.113.102:443;  \r
proxy_for 4 198.51.100.91:8888;
"""

CONFIG_V6 = """default 2;
proxy_for 1 [2001:db8:f23d:f001::d]:8888;
proxy_for 203 [2001:DB8:0203:a::100]:8888;
proxy_for 203 203.0.113.200:8888;
"""


def run(coro: Awaitable[T], timeout: float = 10.0) -> T:
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# --- parse_proxy_config --------------------------------------------------------------------


def test_parse_real_shapes() -> None:
    assert parse_proxy_config(CONFIG_V4) == [
        (1, "192.0.2.50", 8888),
        (2, "198.51.100.51", 80),
        (203, "203.0.113.100", 8888),
        (203, "203.0.113.101", 8888),
        (203, "203.0.113.102", 443),
        (4, "198.51.100.91", 8888),
    ]
    assert parse_proxy_config(CONFIG_V6) == [
        (1, "2001:db8:f23d:f001::d", 8888),
        (203, "2001:db8:203:a::100", 8888),  # canonical form
        (203, "203.0.113.200", 8888),
    ]


@pytest.mark.parametrize(
    "line",
    [
        "proxy_for 203;",  # no address (the group is optional in the expression)
        "proxy_for 203 ;",
        "proxy_for 203 203.0.113.1:8888",  # no semicolon
        "proxy_for 203 203.0.113.1:8888 ;",  # nothing may come between address and ";"
        "proxy_for 203 203.0.113.1:8888; # comment",
        "proxy_for -203 203.0.113.1:8888;",
        "proxy_for 2o3 203.0.113.1:8888;",
        "proxy_for 203 203.0.113.1:8888 x;",
        "proxy_for203 203.0.113.1:8888;",
        "xproxy_for 203 203.0.113.1:8888;",
        "proxy_for 203 203.0.113.1;",  # no port
        "proxy_for 203 203.0.113.1:0;",
        "proxy_for 203 203.0.113.1:65536;",
        "proxy_for 203 203.0.113.1:+80;",
        "proxy_for 203 2001:db8::1:8888;",  # IPv6 without brackets
        "proxy_for 203 [203.0.113.1]:8888;",
        "proxy_for 203 [fe80::1%eth0]:8888;",
        "proxy_for 203 core.example:8888;",
        "proxy_for 203 203.0.113.1:8888;;",
        "proxy_for \u0662\u0660\u0663 203.0.113.1:8888;",  # Arabic-Indic digits
        "proxy_for\u00a0203 203.0.113.1:8888;",  # no-break space is not \\s in Go
        "proxy_for\x0b203 203.0.113.1:8888;",  # nor is \\v
        "proxy_for 203 203.0.113.1:\u0668\u0668;",
        "proxy_for 1" + "0" * 40 + "1 203.0.113.1:8888;",  # does not fit in an int
    ],
)
def test_lines_that_do_not_count(line: str) -> None:
    assert parse_proxy_config(line) == []
    assert parse_proxy_config(f"proxy_for 203 203.0.113.9:1;\n{line}\n") == [
        (203, "203.0.113.9", 1)
    ]


@pytest.mark.parametrize(
    ("line", "entry"),
    [
        ("\t proxy_for\t0203\f203.0.113.1:8888;\r", (203, "203.0.113.1", 8888)),
        ("proxy_for 0 203.0.113.1:1;", (0, "203.0.113.1", 1)),
        ("proxy_for 203 [::ffff:203.0.113.1]:65535;", (203, "::ffff:cb00:7101", 65535)),
        ("proxy_for 203 203.0.113.1:08888;", (203, "203.0.113.1", 8888)),
    ],
)
def test_lines_that_count(line: str, entry: tuple[int, str, int]) -> None:
    assert parse_proxy_config(line) == [entry]


_ip = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


@given(
    entries=st.lists(
        st.tuples(st.integers(0, 10**9), _ip, st.integers(1, 65535)),
        max_size=20,
    ),
    noise=st.lists(st.text(max_size=40), max_size=20),
)
def test_generated_configs_round_trip(
    entries: list[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address, int]],
    noise: list[str],
) -> None:
    lines = []
    for dc, ip, port in entries:
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        lines.append(f"proxy_for {dc} {host}:{port};")
    # Noise lines without "proxy_for" and without newlines never count.
    junk = [n.replace("\n", " ") for n in noise if "proxy_for" not in n]
    text = "\n".join(junk + lines)
    assert parse_proxy_config(text) == [(dc, str(ip), port) for dc, ip, port in entries]


@settings(max_examples=300)
@given(
    st.text(
        alphabet=st.sampled_from(list("proxy_for 0123[]:.;abcdef\t\r\n%-+ \u0663")), max_size=80
    )
)
def test_random_text_never_raises(text: str) -> None:
    for dc, ip, port in parse_proxy_config(text):
        assert dc >= 0
        assert str(ipaddress.ip_address(ip)) == ip
        assert 0 < port < 65536


@given(st.text(max_size=200))
def test_any_text_never_raises(text: str) -> None:
    parse_proxy_config(text)
    parse_proxy_config("proxy_for 203 " + text)


# --- PublicConfigUpdater -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def config_server(
    answers: dict[str, bytes],
) -> AsyncIterator[tuple[str, list[tuple[str, str]]]]:
    """Serves raw answers by path; yields (base URL, [(path, user agent)])."""
    asked: list[tuple[str, str]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            path = head.split(" ", 2)[1]
            agent = next(
                (line[12:] for line in head.split("\r\n") if line.startswith("User-Agent: ")), ""
            )
            asked.append((path, agent))
            writer.write(answers.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
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


def ok(text: str) -> bytes:
    body = text.encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def messages(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]


def test_default_urls() -> None:
    assert DEFAULT_URLS == (
        "https://core.telegram.org/getProxyConfig",
        "https://core.telegram.org/getProxyConfigV6",
    )


def test_one_round_per_family_publishes_dc203(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    updates: list[tuple[int, tuple[tuple[str, int], ...]]] = []

    async def main() -> list[tuple[str, str]]:
        answers = {"/v4": ok(CONFIG_V4), "/v6": ok(CONFIG_V6)}
        async with config_server(answers) as (base, asked):
            updater = PublicConfigUpdater(
                fetch_url=url_fetcher(timeout=3.0),
                on_update=lambda family, addresses: updates.append((family, addresses)),
                urls=(f"{base}/v4", f"{base}/v6"),
            )
            assert await updater.update(socket.AF_INET) is True
            assert await updater.update(socket.AF_INET6) is True
            return asked

    asked = run(main())
    assert asked == [("/v4", "curl/8.5.0"), ("/v6", "curl/8.5.0")]
    assert updates == [
        (
            socket.AF_INET,
            (("203.0.113.100", 8888), ("203.0.113.101", 8888), ("203.0.113.102", 443)),
        ),
        # the IPv4 entry of the IPv6 list is not an IPv6 address
        (socket.AF_INET6, (("2001:db8:203:a::100", 8888),)),
    ]
    info = logging.INFO
    assert messages(caplog) == [
        (info, "start update"),
        (info, "found 203.0.113.100:8888 address for DC 203"),
        (info, "found 203.0.113.101:8888 address for DC 203"),
        (info, "found 203.0.113.102:443 address for DC 203"),
        (info, "updated"),
        (info, "start update"),
        (info, "found [2001:db8:203:a::100]:8888 address for DC 203"),
        (info, "updated"),
    ]


def test_errors_keep_the_previous_list(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    table = DCTable()

    async def main() -> None:
        answers = {"/good": ok(CONFIG_V4), "/empty": ok("default 2;\n")}
        async with config_server(answers) as (base, _):
            fetch = url_fetcher(timeout=3.0)

            def updater(path: str) -> PublicConfigUpdater:
                return PublicConfigUpdater(
                    fetch_url=fetch,
                    on_update=lambda family, addrs: table.set_auto_addresses(203, family, addrs),
                    urls=(f"{base}{path}", f"{base}{path}"),
                )

            assert await updater("/good").update(socket.AF_INET) is True
            before = table.auto.get(socket.AF_INET, 203)
            assert len(before) == 3
            # a 404 is an error: nothing changes
            assert await updater("/missing").update(socket.AF_INET) is False
            assert table.auto.get(socket.AF_INET, 203) == before
            # a good answer without DC 203 replaces the list by an empty one
            assert await updater("/empty").update(socket.AF_INET) is True
            assert table.auto.get(socket.AF_INET, 203) == ()

    run(main())
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["cannot update"]
    assert warnings[0].error.endswith('/missing": unexpected status code 404')  # type: ignore[attr-defined]


def test_dc_table_gets_the_addresses_after_the_builtins() -> None:
    table = DCTable()

    async def fetch(url: str) -> bytes:
        return (CONFIG_V4 if url == "v4" else CONFIG_V6).encode()

    updater = PublicConfigUpdater(
        fetch_url=fetch,
        on_update=lambda family, addrs: table.set_auto_addresses(203, family, addrs),
        urls=("v4", "v6"),
    )
    run(updater.update(socket.AF_INET))
    run(updater.update(socket.AF_INET6))
    result = table.addresses(203, "prefer-ipv6")
    assert result[:3] == [
        ("2a0a:f280:203:a:5000::100", 443),
        ("2001:db8:203:a::100", 8888),
        ("91.105.192.100", 443),
    ]
    assert set(result[3:]) == {
        ("203.0.113.100", 8888),
        ("203.0.113.101", 8888),
        ("203.0.113.102", 443),
    }


def test_run_repeats_both_families_and_logs_stop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        rounds: asyncio.Queue[tuple[int, tuple[tuple[str, int], ...]]] = asyncio.Queue()
        answers = {"/v4": ok(CONFIG_V4), "/v6": ok(CONFIG_V6)}
        async with config_server(answers) as (base, asked):
            updater = PublicConfigUpdater(
                fetch_url=url_fetcher(timeout=3.0),
                on_update=lambda family, addrs: rounds.put_nowait((family, addrs)),
                urls=(f"{base}/v4", f"{base}/v6"),
                every=0.01,
            )
            task = asyncio.create_task(updater.run())
            seen: dict[int, int] = {socket.AF_INET: 0, socket.AF_INET6: 0}
            while min(seen.values()) < 2:  # each family updated at least twice
                family, _ = await rounds.get()
                seen[family] += 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert {path for path, _ in asked} == {"/v4", "/v6"}

    run(main())
    stops = [m for level, m in messages(caplog) if m == "stop updating"]
    assert len(stops) == 2  # one per family loop


def test_run_survives_failures(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        calls = 0
        delivered: asyncio.Queue[int] = asyncio.Queue()

        async def fetch(url: str) -> bytes:
            nonlocal calls
            calls += 1
            if calls <= 2:
                raise OSError("network is unreachable")
            return CONFIG_V4.encode()

        def on_update(family: int, addrs: tuple[tuple[str, int], ...]) -> None:
            if family == socket.AF_INET6:
                raise RuntimeError("consumer broke")
            delivered.put_nowait(family)

        updater = PublicConfigUpdater(
            fetch_url=fetch, on_update=on_update, urls=("a", "b"), every=0.01
        )
        task = asyncio.create_task(updater.run())
        assert await delivered.get() == socket.AF_INET
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    levels = {(level, m) for level, m in messages(caplog)}
    assert (logging.WARNING, "cannot update") in levels  # the download errors
    assert (logging.ERROR, "cannot update") in levels  # the broken consumer


def test_bad_arguments() -> None:
    async def fetch(url: str) -> bytes:
        return b""

    with pytest.raises(ValueError, match="positive"):
        PublicConfigUpdater(fetch_url=fetch, on_update=lambda f, a: None, every=0)
    updater = PublicConfigUpdater(fetch_url=fetch, on_update=lambda f, a: None)
    with pytest.raises(ValueError, match="family"):
        run(updater.update(socket.AF_UNIX))
