"""Kernel signals: the nstat counters parsed from real /proc files, the listening sockets
from /proc/net/tcp* and netlink sock_diag, their mapping to worker slots, and the
families a scrape serves.

The files in ``fixtures/`` were copied from a Linux 6.18 machine: ``proc_net_netstat``
and ``proc_net_snmp`` as they were; ``proc_net_tcp``/``tcp6`` while a listener with
backlog 5 (IPv4, port 60341) had 3 connections queued and one with backlog 7 (IPv6,
port 48583) had 2; ``sock_diag_listen_v4.bin`` is the netlink reply to a dump of the
listening IPv4 sockets while a listener on port 35323 (backlog 5) had 3 queued.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.exporter import kernel
from supervisor.exporter.exposition import Scraper
from supervisor.exporter.kernel import (
    KERNEL_COUNTERS,
    ListenSocket,
    SlotQueues,
    diag_listen_sockets,
    kernel_families,
    parse_proc_net_tcp,
    parse_proc_table,
    parse_sock_diag,
    proc_listen_sockets,
    read_tcp_counters,
    socket_inodes,
)
from supervisor.exporter.pool import PoolSnapshot, WorkerStats
from supervisor.states import WorkerState
from tests.stats.helpers import parse, wait_until

FIXTURES = Path(__file__).parent / "fixtures"


def _fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_netstat_and_snmp_tables_parse() -> None:
    netstat = parse_proc_table(_fixture("proc_net_netstat"))
    snmp = parse_proc_table(_fixture("proc_net_snmp"))
    assert netstat[("TcpExt", "ListenOverflows")] == 36
    assert netstat[("TcpExt", "ListenDrops")] == 36
    assert netstat[("TcpExt", "TCPAbortOnData")] == 1035
    assert netstat[("TcpExt", "TCPSynRetrans")] == 0
    assert netstat[("IpExt", "InOctets")] == 45543487512
    assert snmp[("Tcp", "PassiveOpens")] == 478847
    assert snmp[("Tcp", "CurrEstab")] == 0
    assert snmp[("Tcp", "MaxConn")] == -1  # signed values stay signed
    assert snmp[("Udp", "NoPorts")] == 1966
    # every section of the files was read, none mixed with its neighbour
    assert {s for s, _ in netstat} == {"TcpExt", "IpExt", "MPTcpExt"}
    assert {s for s, _ in snmp} == {"Ip", "Icmp", "IcmpMsg", "Tcp", "Udp", "UdpLite"}


def test_broken_sections_are_skipped() -> None:
    text = "Tcp: A B\nTcp: 1 2 3\nUdp: X\nUdp: 7\nOdd: Y\nOther: 1\n"
    assert parse_proc_table(text) == {("Udp", "X"): 7}
    assert parse_proc_table("") == {}


def test_counters_are_read_from_a_proc_tree(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    shutil.copy(FIXTURES / "proc_net_netstat", tmp_path / "net" / "netstat")
    counters = read_tcp_counters(str(tmp_path))  # net/snmp is missing: skipped
    assert counters[("TcpExt", "ListenDrops")] == 36
    assert ("Tcp", "PassiveOpens") not in counters
    shutil.copy(FIXTURES / "proc_net_snmp", tmp_path / "net" / "snmp")
    assert read_tcp_counters(str(tmp_path))[("Tcp", "PassiveOpens")] == 478847
    # and this machine's own files have every field the exporter serves
    live = read_tcp_counters()
    assert all((spec.section, spec.field) in live for spec in KERNEL_COUNTERS)


def test_listening_sockets_of_proc_net_tcp() -> None:
    v4 = parse_proc_net_tcp(_fixture("proc_net_tcp"))
    v6 = parse_proc_net_tcp(_fixture("proc_net_tcp6"))
    assert ListenSocket(1298578, 60341, 3, None) in v4
    assert all(s.port != 0x87CC for s in v4)  # established sockets are not listening
    assert len(v4) == 2
    assert v6 == [ListenSocket(1298579, 48583, 2, None)]
    assert parse_proc_net_tcp("header\n   0: garbage\n") == []


def test_listening_sockets_of_a_sock_diag_reply() -> None:
    sockets, done = parse_sock_diag((FIXTURES / "sock_diag_listen_v4.bin").read_bytes())
    assert done
    assert ListenSocket(1299477, 35323, 3, 5) in sockets
    # an error reply (NLMSG_ERROR with -EPERM) raises
    error = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -1) + bytes(16)
    with pytest.raises(PermissionError):
        parse_sock_diag(error)
    # a truncated buffer yields what it holds and no end
    assert parse_sock_diag(b"\x00" * 10) == ([], False)


@pytest.fixture
def queued_listener() -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(6)
    clients = [socket.create_connection(listener.getsockname(), timeout=5) for _ in range(4)]
    yield listener, clients
    for sock in [*clients, listener]:
        sock.close()


def test_live_sockets_from_netlink_and_proc(
    queued_listener: tuple[socket.socket, list[socket.socket]],
) -> None:
    listener, _ = queued_listener
    inode = os.fstat(listener.fileno()).st_ino
    port = listener.getsockname()[1]
    found = wait_until(
        lambda: (s := diag_listen_sockets().get(inode)) and s.queue == 4 and s,
        5,
        "4 queued connections in sock_diag",
    )
    assert found == ListenSocket(inode, port, 4, 6)
    assert proc_listen_sockets()[inode] == ListenSocket(inode, port, 4, None)
    assert inode in socket_inodes(os.getpid())


def test_netlink_refused_falls_back_to_proc(
    monkeypatch: pytest.MonkeyPatch, queued_listener: tuple[socket.socket, list[socket.socket]]
) -> None:
    listener, _ = queued_listener
    inode = os.fstat(listener.fileno()).st_ino

    def refused(timeout: float = 2.0) -> dict[int, ListenSocket]:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(kernel, "diag_listen_sockets", refused)
    assert kernel.listen_sockets()[inode].backlog is None


@pytest.fixture
def slot_holder() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A process that holds a listening socket (as a worker holds its slot's) and other
    sockets, as a worker with sessions would."""
    code = (
        "import socket, sys\n"
        "others = [socket.socket() for _ in range(3)]\n"
        "l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(9)\n"
        "print(l.getsockname()[1], flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    yield proc, port
    proc.kill()
    proc.wait(5)


def test_slots_are_mapped_through_the_workers_descriptors(
    slot_holder: tuple[subprocess.Popen[bytes], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, port = slot_holder
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        queues = SlotQueues()
        got = wait_until(
            lambda: (
                (q := queues.read([(3, proc.pid)], diag_listen_sockets())) and q[3][0] == 2 and q
            ),
            5,
            "the slot's queue",
        )
        assert got == {3: (2, 9)}
        # The inode is remembered: the descriptors are not listed again for that PID.
        calls: list[int] = []
        real = kernel.socket_inodes

        def counting(pid: int, proc_root: str = "/proc") -> list[int]:
            calls.append(pid)
            return real(pid, proc_root)

        monkeypatch.setattr(kernel, "socket_inodes", counting)
        assert queues.read([(3, proc.pid)], diag_listen_sockets()) == {3: (2, 9)}
        assert calls == []
        # A PID without a listening socket (this one has none of the dump's) is left out.
        assert queues.read([(3, proc.pid), (4, os.getpid())], {}) == {}
        assert calls == [proc.pid, os.getpid()]
        # The same socket seen through two workers of a slot (a reload) counts once.
        assert queues.read([(3, proc.pid), (3, proc.pid)], diag_listen_sockets()) == {3: (2, 9)}
    finally:
        for client in clients:
            client.close()


def test_two_sockets_of_one_slot_add_up() -> None:
    # A reload to another bind-to: the old and the new generation of a slot listen on
    # different sockets for a moment.
    queues = SlotQueues()
    queues._inode_of.update({201: 11, 202: 13, 203: 14})
    sockets = {
        11: ListenSocket(11, 443, 3, 10),
        13: ListenSocket(13, 8443, 4, 20),
        14: ListenSocket(14, 8443, 1, None),
    }
    assert queues.read([(0, 201), (0, 202)], sockets) == {0: (7, 30)}
    assert set(queues._inode_of) == {201, 202}  # PIDs no longer listed are forgotten
    queues._inode_of[203] = 14
    assert queues.read([(0, 201), (0, 203)], sockets) == {0: (4, None)}


def test_kernel_families() -> None:
    counters = parse_proc_table(_fixture("proc_net_netstat")) | parse_proc_table(
        _fixture("proc_net_snmp")
    )
    del counters[("TcpExt", "TCPSynRetrans")]  # an older kernel without the field
    sockets = {11: ListenSocket(11, 443, 4096, 4096), 12: ListenSocket(12, 443, 0, None)}
    queues = SlotQueues()
    queues._inode_of.update({101: 11, 102: 12})
    families = kernel_families(
        "mtg", [(0, 101), (1, 102)], queues, counters=counters, sockets=sockets
    )
    by_name = {name: (kind, samples) for name, kind, _, samples in families}
    assert by_name["mtg_kernel_tcp_listen_drops"] == ("counter", [((), 36.0)])
    assert by_name["mtg_kernel_tcp_current_established"] == ("gauge", [((), 0.0)])
    assert "mtg_kernel_tcp_syn_retransmits" not in by_name
    assert by_name["mtg_listen_queue_length"] == (
        "gauge",
        [((("slot", "0"),), 4096.0), ((("slot", "1"),), 0.0)],
    )
    assert by_name["mtg_listen_queue_backlog"] == ("gauge", [((("slot", "0"),), 4096.0)])
    # without workers (no scoreboard) only the counters
    names = {f[0] for f in kernel_families("x", [], SlotQueues(), counters=counters)}
    assert names == {f"x_{s.name}" for s in KERNEL_COUNTERS} - {"x_kernel_tcp_syn_retransmits"}


def test_a_scrape_serves_the_kernel_families(
    metrics_dir: str, slot_holder: tuple[subprocess.Popen[bytes], int]
) -> None:
    proc, _ = slot_holder
    snapshot = PoolSnapshot(
        started_at=time.time(),
        workers=(WorkerStats(2, proc.pid, WorkerState.READY, 0, None, None, None),),
    )
    scraper = Scraper(metrics_dir, "mtg", lambda: snapshot)
    body, _ = scraper.scrape()
    series = parse(body.decode())
    for spec in KERNEL_COUNTERS:
        name = f"mtg_{spec.name}" + ("_total" if spec.kind == "counter" else "")
        assert name in series, name
        assert name.replace("_total", "") not in series or spec.kind == "gauge"
    assert series["mtg_listen_queue_length"] == {(("slot", "2"),): 0.0}
    assert series["mtg_listen_queue_backlog"] == {(("slot", "2"),): 9.0}
    text = body.decode()
    assert "# TYPE mtg_kernel_tcp_listen_drops_total counter" in text
    # a scrape without the pool (no workers) still has the counters
    counters_only = parse(Scraper(metrics_dir, "mtg").scrape()[0].decode())
    assert "mtg_kernel_tcp_passive_opens_total" in counters_only
    assert "mtg_listen_queue_length" not in counters_only
