"""statsd observer: mtg's line formats, datagram packing, the 100 ms flush, a real worker."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtgworkers import events as ev
from mtgworkers.stats import StatsError
from mtgworkers.stats.statsd import MAX_PACKET, StatsdObserver, format_line
from tests.stats.helpers import WorkerProcess, wait_until, worker_config
from tests.support.client import FakeTLSClient
from tests.support.env import KitSecret
from tests.support.fakedc import FakeDC
from tests.support.website import Website

TELEGRAM_TAGS = (("telegram_ip", "10.1.0.10"), ("dc", "2"), ("direction", "to_client"))

# A line as mtg writes it, per tag format: name, optional tags, value, type.
LINE_RE = {
    "datadog": re.compile(
        r"(?P<name>[a-z0-9._]+):(?P<value>[+-]?\d+)\|(?P<kind>[cg])(\|#(?P<tags>.+))?"
    ),
    "influxdb": re.compile(
        r"(?P<name>[a-z0-9._]+)(?P<tags>(,[a-z_]+=[^,:]+)*):(?P<value>[+-]?\d+)\|(?P<kind>[cg])"
    ),
    "graphite": re.compile(
        r"(?P<name>[a-z0-9._]+)(?P<tags>(;[a-z_]+=[^;]+)*):(?P<value>[+-]?\d+)\|(?P<kind>[cg])"
    ),
}


def test_formats_are_mtgs() -> None:
    # The examples of docs/mtg-compat.md c.3, verbatim.
    assert format_line("mtg.", "telegram_traffic", "30", "c", TELEGRAM_TAGS, "datadog") == (
        b"mtg.telegram_traffic:30|c|#telegram_ip:10.1.0.10,dc:2,direction:to_client\n"
    )
    assert format_line("mtg.", "telegram_traffic", "30", "c", TELEGRAM_TAGS, "influxdb") == (
        b"mtg.telegram_traffic,telegram_ip=10.1.0.10,dc=2,direction=to_client:30|c\n"
    )
    assert format_line("mtg.", "telegram_traffic", "30", "c", TELEGRAM_TAGS, "graphite") == (
        b"mtg.telegram_traffic;telegram_ip=10.1.0.10;dc=2;direction=to_client:30|c\n"
    )
    for tag_format in ("datadog", "influxdb", "graphite"):
        assert format_line("mtg.", "replay_attacks", "1", "c", (), tag_format) == (
            b"mtg.replay_attacks:1|c\n"
        )
    assert format_line(
        "mtg.", "client_connections", "+1", "g", (("ip_family", "ipv4"),), "datadog"
    ) == (b"mtg.client_connections:+1|g|#ip_family:ipv4\n")
    with pytest.raises(ValueError):
        format_line("mtg.", "x", "1", "c", (("a", "b"),), "json")


class Listener:
    """A UDP socket on loopback collecting datagrams."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.datagrams: list[bytes] = []

    def receive(self, timeout: float) -> bytes | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        self.datagrams.append(data)
        return data

    def drain(self) -> None:
        while self.receive(0.05) is not None:
            pass

    def lines(self) -> list[str]:
        return [line for d in self.datagrams for line in d.decode().split("\n") if line]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    udp = Listener()
    yield udp
    udp.close()


def _session_events() -> list[ev.Event]:
    return [
        ev.EventIPListSize(2, is_blocklist=False),
        ev.EventStart("a", "192.0.2.7"),
        ev.EventConnectedToDC("a", "10.1.0.10", 2),
        ev.EventTraffic("a", 30, True),
        ev.EventTraffic("a", 40, False),
        ev.EventStart("b", "2001:db8::5"),
        ev.EventDomainFronting("b"),
        ev.EventTraffic("b", 100, False),
        ev.EventReplayAttack("b"),
        ev.EventConcurrencyLimited(),
        ev.EventIPBlocklisted("198.51.100.1", is_blocklist=True),
        ev.EventFinish("a"),
        ev.EventFinish("b"),
        ev.EventTraffic("zzz", 5, True),  # unknown stream: ignored
        ev.EventFinish("zzz"),
    ]


EXPECTED = {
    "datadog": [
        "mtg.iplist_size:2|g|#ip_list:allowlist",
        "mtg.client_connections:+1|g|#ip_family:ipv4",
        "mtg.telegram_connections:+1|g|#telegram_ip:10.1.0.10,dc:2",
        "mtg.telegram_traffic:30|c|#telegram_ip:10.1.0.10,dc:2,direction:to_client",
        "mtg.telegram_traffic:40|c|#telegram_ip:10.1.0.10,dc:2,direction:from_client",
        "mtg.client_connections:+1|g|#ip_family:ipv6",
        "mtg.domain_fronting:1|c",
        "mtg.domain_fronting_connections:+1|g|#ip_family:ipv6",
        "mtg.domain_fronting_traffic:100|c|#direction:from_client",
        "mtg.replay_attacks:1|c",
        "mtg.concurrency_limited:1|c",
        "mtg.ip_blocklisted:1|c|#ip_list:blocklist",
        "mtg.client_connections:-1|g|#ip_family:ipv4",
        "mtg.telegram_connections:-1|g|#telegram_ip:10.1.0.10,dc:2",
        "mtg.client_connections:-1|g|#ip_family:ipv6",
        "mtg.domain_fronting_connections:-1|g|#ip_family:ipv6",
    ],
    "influxdb": [
        "mtg.iplist_size,ip_list=allowlist:2|g",
        "mtg.client_connections,ip_family=ipv4:+1|g",
        "mtg.telegram_connections,telegram_ip=10.1.0.10,dc=2:+1|g",
        "mtg.telegram_traffic,telegram_ip=10.1.0.10,dc=2,direction=to_client:30|c",
        "mtg.telegram_traffic,telegram_ip=10.1.0.10,dc=2,direction=from_client:40|c",
        "mtg.client_connections,ip_family=ipv6:+1|g",
        "mtg.domain_fronting:1|c",
        "mtg.domain_fronting_connections,ip_family=ipv6:+1|g",
        "mtg.domain_fronting_traffic,direction=from_client:100|c",
        "mtg.replay_attacks:1|c",
        "mtg.concurrency_limited:1|c",
        "mtg.ip_blocklisted,ip_list=blocklist:1|c",
        "mtg.client_connections,ip_family=ipv4:-1|g",
        "mtg.telegram_connections,telegram_ip=10.1.0.10,dc=2:-1|g",
        "mtg.client_connections,ip_family=ipv6:-1|g",
        "mtg.domain_fronting_connections,ip_family=ipv6:-1|g",
    ],
    "graphite": [
        "mtg.iplist_size;ip_list=allowlist:2|g",
        "mtg.client_connections;ip_family=ipv4:+1|g",
        "mtg.telegram_connections;telegram_ip=10.1.0.10;dc=2:+1|g",
        "mtg.telegram_traffic;telegram_ip=10.1.0.10;dc=2;direction=to_client:30|c",
        "mtg.telegram_traffic;telegram_ip=10.1.0.10;dc=2;direction=from_client:40|c",
        "mtg.client_connections;ip_family=ipv6:+1|g",
        "mtg.domain_fronting:1|c",
        "mtg.domain_fronting_connections;ip_family=ipv6:+1|g",
        "mtg.domain_fronting_traffic;direction=from_client:100|c",
        "mtg.replay_attacks:1|c",
        "mtg.concurrency_limited:1|c",
        "mtg.ip_blocklisted;ip_list=blocklist:1|c",
        "mtg.client_connections;ip_family=ipv4:-1|g",
        "mtg.telegram_connections;telegram_ip=10.1.0.10;dc=2:-1|g",
        "mtg.client_connections;ip_family=ipv6:-1|g",
        "mtg.domain_fronting_connections;ip_family=ipv6:-1|g",
    ],
}


@pytest.mark.parametrize("tag_format", ["datadog", "influxdb", "graphite"])
def test_events_become_mtgs_lines(listener: Listener, tag_format: str) -> None:
    observer = StatsdObserver("127.0.0.1", listener.port, "mtg.", tag_format)
    for event in _session_events():
        observer(event)
    assert listener.receive(0.05) is None  # nothing leaves before the flush
    observer.close()  # flushes
    listener.drain()
    assert listener.lines() == EXPECTED[tag_format]
    assert all(d.endswith(b"\n") for d in listener.datagrams)


def test_accept_refusals_are_a_counter_tagged_with_the_reason(listener: Listener) -> None:
    observer = StatsdObserver("127.0.0.1", listener.port, "mtg.", "influxdb")
    observer(ev.EventAcceptRefused("emfile"))
    observer(ev.EventAcceptRefused("enfile"))
    observer.close()
    listener.drain()
    assert listener.lines() == [
        "mtg.accept_refused,reason=emfile:1|c",
        "mtg.accept_refused,reason=enfile:1|c",
    ]


def test_hellos_without_sni_are_a_plain_counter(listener: Listener) -> None:
    observer = StatsdObserver("127.0.0.1", listener.port, "mtg.", "datadog")
    observer(ev.EventHelloWithoutSNI("s"))
    observer.close()
    listener.drain()
    assert listener.lines() == ["mtg.client_hellos_without_sni:1|c"]


def test_evictions_are_a_plain_counter(listener: Listener) -> None:
    observer = StatsdObserver("127.0.0.1", listener.port, "mtg.", "datadog")
    observer(ev.EventConcurrencyEvicted())
    observer.close()
    listener.drain()
    assert listener.lines() == ["mtg.concurrency_evicted:1|c"]


def test_configured_prefix_is_prepended_verbatim(listener: Listener) -> None:
    # mtg quirk: metric-prefix = "mtg" gives "mtgclient_connections".
    observer = StatsdObserver("127.0.0.1", listener.port, "mtg", "datadog")
    observer(ev.EventStart("a", "192.0.2.7"))
    observer.close()
    listener.drain()
    assert listener.lines() == ["mtgclient_connections:+1|g|#ip_family:ipv4"]


def test_lines_are_packed_into_datagrams_of_at_most_1432_bytes(listener: Listener) -> None:
    observer = StatsdObserver("127.0.0.1", listener.port, "mtg.", "datadog")
    sent: list[str] = []
    for n in range(300):
        observer(ev.EventStart(f"s{n}", f"192.0.2.{n % 250}"))
        observer(ev.EventConnectedToDC(f"s{n}", f"149.154.167.{n % 200}", 1 + n % 5))
        observer(ev.EventTraffic(f"s{n}", 1000 + n, n % 2 == 0))
        sent += [
            "mtg.client_connections:+1|g|#ip_family:ipv4",
            f"mtg.telegram_connections:+1|g|#telegram_ip:149.154.167.{n % 200},dc:{1 + n % 5}",
            f"mtg.telegram_traffic:{1000 + n}|c|#telegram_ip:149.154.167.{n % 200},"
            f"dc:{1 + n % 5},direction:{'to_client' if n % 2 == 0 else 'from_client'}",
        ]
    observer.close()
    listener.drain()
    sizes = [len(d) for d in listener.datagrams]
    assert max(sizes) <= MAX_PACKET
    assert min(sizes[:-1]) > MAX_PACKET - 100  # full datagrams, not one line each
    assert all(d.endswith(b"\n") for d in listener.datagrams)
    assert listener.lines() == sent


def test_a_partial_datagram_leaves_within_100_ms(listener: Listener) -> None:
    loop = asyncio.new_event_loop()
    try:
        observer = StatsdObserver("127.0.0.1", listener.port, "mtg.", "graphite")
        observer.start(loop)
        observer(ev.EventReplayAttack("x"))
        sent_at = time.monotonic()
        loop.run_until_complete(asyncio.sleep(0.25))
        assert listener.receive(1.0) == b"mtg.replay_attacks:1|c\n"
        # the timer fired at ~100 ms (well before the loop stopped at 250 ms)
        observer(ev.EventConcurrencyLimited())
        loop.run_until_complete(asyncio.sleep(0.15))
        assert listener.receive(1.0) == b"mtg.concurrency_limited:1|c\n"
        assert time.monotonic() - sent_at < 1.5
        observer.close()
    finally:
        loop.close()
    assert observer.sent == 2


def test_an_absent_statsd_server_costs_datagrams_not_errors() -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    observer = StatsdObserver("127.0.0.1", port, "mtg.", "datadog")
    for _ in range(5):
        observer(ev.EventReplayAttack("x"))
        observer.flush()
        time.sleep(0.01)  # the ICMP port unreachable comes back as ECONNREFUSED
    observer.close()
    assert observer.lost >= 1
    assert observer.lost + observer.sent == 5


def test_ipv6_statsd_address() -> None:
    try:
        udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        udp.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        observer = StatsdObserver("::1", udp.getsockname()[1], "mtg.", "influxdb")
        observer(ev.EventIPListSize(7, is_blocklist=True))
        observer.close()
        udp.settimeout(2)
        assert udp.recv(2048) == b"mtg.iplist_size,ip_list=blocklist:7|g\n"
    finally:
        udp.close()


def test_unknown_tag_format_is_refused() -> None:
    with pytest.raises(StatsError):
        StatsdObserver("127.0.0.1", 8125, "mtg.", "json")


@pytest.mark.e2e
@pytest.mark.parametrize("tag_format", ["datadog", "influxdb", "graphite"])
def test_a_worker_sends_well_formed_lines(
    tmp_path: Path,
    test_secret: KitSecret,
    fake_dc: FakeDC,
    website: Website,
    listener: Listener,
    tag_format: str,
) -> None:
    config = worker_config(
        test_secret.hex,
        fake_dc.port,
        website.port,
        {
            "stats": {
                "prometheus": {"enabled": False},
                "statsd": {
                    "enabled": True,
                    "address": f"127.0.0.1:{listener.port}",
                    "tag-format": tag_format,
                },
            }
        },
    )
    worker = WorkerProcess(tmp_path, config, 0).start()
    try:
        worker.wait_listening()
        with FakeTLSClient(worker.host, worker.port, test_secret.key, test_secret.host) as client:
            client.handshake(dc=3)
            data = os.urandom(3000)
            client.send(data)
            assert client.recv_exactly(3000) == data

        def finished() -> bool:
            listener.receive(0.2)
            return any(
                line.startswith("mtg.telegram_connections") and "-1|g" in line
                for line in listener.lines()
            )

        wait_until(finished, 5, "the session's last lines")
    finally:
        assert worker.stop() == 0, worker.output()
    listener.drain()
    lines = listener.lines()
    pattern = LINE_RE[tag_format]
    parsed = []
    for line in lines:
        match = pattern.fullmatch(line)
        assert match, f"malformed {tag_format} line {line!r}"
        parsed.append(match)
    assert all(d.endswith(b"\n") and len(d) <= MAX_PACKET for d in listener.datagrams)

    def tags_of(match: re.Match[str]) -> dict[str, str]:
        text = match.group("tags") or ""
        if tag_format == "datadog":
            return dict(pair.split(":", 1) for pair in text.split(",") if pair)
        separator = "," if tag_format == "influxdb" else ";"
        return dict(pair.split("=", 1) for pair in text.split(separator) if pair)

    def values(name: str, **tags: str) -> list[str]:
        return [
            m.group("value")
            for m in parsed
            if m.group("name") == "mtg." + name
            and all(tags_of(m).get(k) == v for k, v in tags.items())
        ]

    assert values("client_connections", ip_family="ipv4") == ["+1", "-1"]
    assert values("telegram_connections", telegram_ip="127.0.0.1", dc="3") == ["+1", "-1"]
    for direction in ("to_client", "from_client"):
        counted = values("telegram_traffic", telegram_ip="127.0.0.1", dc="3", direction=direction)
        assert sum(int(v) for v in counted) == 3000
    assert values("iplist_size", ip_list="allowlist") == ["2"]
