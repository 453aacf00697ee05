"""Kernel signals as metrics: the TCP counters an operator reads with ``nstat``, and the
accept queue of every worker slot's listening socket.

Read at scrape time, in the exporter process, so they cost nothing between scrapes:

- **TCP counters** from ``/proc/net/netstat`` (``TcpExt:``) and ``/proc/net/snmp``
  (``Tcp:``), both in the "names line, values line" format that :func:`parse_proc_table`
  reads. They are counted per *network namespace*: the exporter runs in the proxy's, so
  inside a container they are the container's, on a host the host's (every program's
  connections, not only the proxy's). :data:`KERNEL_COUNTERS` lists them with their
  metric names; a field the running kernel does not have is left out.
- **Accept queues**: for each slot, how many connections wait in its listening socket's
  queue (``listen_queue_length``) and how many it may hold (``listen_queue_backlog``,
  ``min(backlog, net.core.somaxconn)`` as the kernel applied it at ``listen()``).

Mapping sockets to slots. The supervisor holds every slot's socket, and each worker
process keeps only its own slot's (it closes the other slots' sockets and the exporter's
right after the fork, ``supervisor/worker.py``). The scoreboard names each worker's PID
and slot, so the exporter lists ``/proc/<worker pid>/fd``, finds the one descriptor
that is a listening TCP socket, and reads that socket's queue by its inode. Nothing is
added to the supervisor or to shared memory for it; the exporter runs as the same user
as the workers, which is all ``/proc/<pid>/fd`` asks. A worker's listening socket never
changes during its life, so the inode found for a PID is kept (a busy worker has
thousands of descriptors; only new PIDs are looked at).

Queue figures come from the kernel's socket diagnostics (netlink ``sock_diag``, what
``ss -lnt`` shows as Recv-Q and Send-Q of a listening socket: the queue and its
maximum). Where netlink sockets are not allowed (a seccomp or ``RestrictAddressFamilies``
policy without ``AF_NETLINK``) the queue length comes from ``/proc/net/tcp`` and
``tcp6`` (their ``rx_queue`` column) and the backlog is not served.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "KERNEL_COUNTERS",
    "KernelCounter",
    "ListenSocket",
    "SlotQueues",
    "kernel_families",
    "parse_proc_net_tcp",
    "parse_proc_table",
    "read_tcp_counters",
]

Labels = tuple[tuple[str, str], ...]
FamilyData = tuple[str, str, str, list[tuple[Labels, float]]]  # name, kind, help, samples


@dataclass(frozen=True)
class KernelCounter:
    """One kernel figure: where it is (``section`` of the file, ``field``) and its metric
    (name without the prefix; counters without ``_total``)."""

    section: str
    field: str
    name: str
    kind: str  # counter, gauge
    help: str


KERNEL_COUNTERS: Final = (
    KernelCounter(
        "TcpExt",
        "ListenOverflows",
        "kernel_tcp_listen_overflows",
        "counter",
        "Connections dropped because a listening socket's accept queue was full "
        "(TcpExtListenOverflows, this network namespace).",
    ),
    KernelCounter(
        "TcpExt",
        "ListenDrops",
        "kernel_tcp_listen_drops",
        "counter",
        "Connection attempts a listening socket dropped for any reason, overflows included "
        "(TcpExtListenDrops, this network namespace).",
    ),
    KernelCounter(
        "TcpExt",
        "TCPAbortOnData",
        "kernel_tcp_abort_on_data",
        "counter",
        "Connections reset because they were closed with unread data or data arriving "
        "after the close (TcpExtTCPAbortOnData, this network namespace).",
    ),
    KernelCounter(
        "TcpExt",
        "TCPSynRetrans",
        "kernel_tcp_syn_retransmits",
        "counter",
        "SYN and SYN-ACK retransmissions (TcpExtTCPSynRetrans, this network namespace).",
    ),
    KernelCounter(
        "Tcp",
        "PassiveOpens",
        "kernel_tcp_passive_opens",
        "counter",
        "TCP connections accepted by listening sockets (TcpPassiveOpens, this network namespace).",
    ),
    KernelCounter(
        "Tcp",
        "CurrEstab",
        "kernel_tcp_current_established",
        "gauge",
        "TCP connections now established or in CLOSE-WAIT (TcpCurrEstab, this network namespace).",
    ),
)

PROC_FILES: Final = ("net/netstat", "net/snmp")


def parse_proc_table(text: str) -> dict[tuple[str, str], int]:
    """``{(section, field): value}`` of ``/proc/net/netstat`` or ``/proc/net/snmp``.

    Each section is two lines, ``Section: Name1 Name2 ...`` then ``Section: 1 2 ...``.
    A section whose lines do not pair up is skipped; values that are not integers
    (none in practice) too.
    """
    result: dict[tuple[str, str], int] = {}
    lines = [line.split() for line in text.splitlines() if line.strip()]
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if not names or not values or names[0] != values[0] or not names[0].endswith(":"):
            continue
        section = names[0][:-1]
        if len(names) != len(values):
            continue
        for name, raw in zip(names[1:], values[1:], strict=True):
            with contextlib.suppress(ValueError):
                result[(section, name)] = int(raw)
    return result


def read_tcp_counters(proc: str = "/proc") -> dict[tuple[str, str], int]:
    """The fields of ``net/netstat`` and ``net/snmp`` under ``proc`` (files that cannot be
    read contribute nothing)."""
    result: dict[tuple[str, str], int] = {}
    for name in PROC_FILES:
        try:
            with open(os.path.join(proc, name)) as stream:
                result.update(parse_proc_table(stream.read()))
        except OSError:
            continue
    return result


# -- listening sockets -------------------------------------------------------------------


@dataclass(frozen=True)
class ListenSocket:
    """A listening TCP socket as the kernel reports it."""

    inode: int
    port: int
    queue: int  # connections waiting to be accepted
    backlog: int | None  # the most it may hold; None when unknown (/proc fallback)


TCP_LISTEN: Final = 10
_SOCK_DIAG_BY_FAMILY: Final = 20
_NLM_F_REQUEST: Final = 0x1
_NLM_F_DUMP: Final = 0x300
_NLMSG_ERROR: Final = 2
_NLMSG_DONE: Final = 3
_NETLINK_SOCK_DIAG: Final = 4
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_DIAG_REQ = struct.Struct("=BBBBI48x")  # family, protocol, ext, pad, states, sockid
# inet_diag_msg: family, state, timer, retrans; sockid: sport, dport (big-endian), src,
# dst, if, cookie; expires, rqueue, wqueue, uid, inode.
_DIAG_MSG_HEAD = struct.Struct("=BBBB")
_DIAG_MSG_PORTS = struct.Struct("!HH")
_DIAG_MSG_TAIL = struct.Struct("=IIIII")
_DIAG_MSG_SIZE: Final = 72
_DIAG_TAIL_AT: Final = 52


def parse_sock_diag(data: bytes) -> tuple[list[ListenSocket], bool]:
    """Listening sockets in a buffer of netlink ``inet_diag_msg`` replies; the flag is
    True once the dump's end (``NLMSG_DONE``) was seen. Raises OSError for an error
    reply."""
    sockets: list[ListenSocket] = []
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size or offset + length > len(data):
            break
        body = offset + _NLMSG.size
        if kind == _NLMSG_DONE:
            return sockets, True
        if kind == _NLMSG_ERROR:
            (errno,) = struct.unpack_from("=i", data, body)
            if errno:
                raise OSError(-errno, os.strerror(-errno))
        elif kind == _SOCK_DIAG_BY_FAMILY and length - _NLMSG.size >= _DIAG_MSG_SIZE:
            _family, state, _timer, _retrans = _DIAG_MSG_HEAD.unpack_from(data, body)
            sport, _dport = _DIAG_MSG_PORTS.unpack_from(data, body + 4)
            _exp, rqueue, wqueue, _uid, inode = _DIAG_MSG_TAIL.unpack_from(
                data, body + _DIAG_TAIL_AT
            )
            if state == TCP_LISTEN:
                sockets.append(ListenSocket(inode, sport, rqueue, wqueue))
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return sockets, False


def diag_listen_sockets(timeout: float = 2.0) -> dict[int, ListenSocket]:
    """Every listening TCP socket of this network namespace by inode, from netlink
    ``sock_diag`` (IPv4 and IPv6). Raises OSError (netlink not allowed, say)."""
    found: dict[int, ListenSocket] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(timeout)
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            request = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN)
            header = _NLMSG.pack(
                _NLMSG.size + len(request),
                _SOCK_DIAG_BY_FAMILY,
                _NLM_F_REQUEST | _NLM_F_DUMP,
                seq,
                0,
            )
            sock.send(header + request)
            done = False
            while not done:
                sockets, done = parse_sock_diag(sock.recv(65536))
                for entry in sockets:
                    found[entry.inode] = entry
    return found


def parse_proc_net_tcp(text: str) -> list[ListenSocket]:
    """Listening sockets of a ``/proc/net/tcp`` or ``tcp6`` table (state ``0A``): inode,
    local port and ``rx_queue`` (the accept queue of a listening socket); no backlog."""
    sockets = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != "0A":
            continue
        try:
            port = int(fields[1].rsplit(":", 1)[1], 16)
            queue = int(fields[4].split(":", 1)[1], 16)
            inode = int(fields[9])
        except (IndexError, ValueError):
            continue
        sockets.append(ListenSocket(inode, port, queue, None))
    return sockets


def proc_listen_sockets(proc: str = "/proc") -> dict[int, ListenSocket]:
    """The fallback of :func:`diag_listen_sockets`: ``/proc/net/tcp`` and ``tcp6``."""
    found: dict[int, ListenSocket] = {}
    for name in ("net/tcp", "net/tcp6"):
        try:
            with open(os.path.join(proc, name)) as stream:
                text = stream.read()
        except OSError:
            continue
        for entry in parse_proc_net_tcp(text):
            found[entry.inode] = entry
    return found


def socket_inodes(pid: int, proc: str = "/proc") -> list[int]:
    """Inodes of the sockets process ``pid`` holds, lowest descriptor first (an empty
    list when its ``fd`` directory cannot be read)."""
    directory = os.path.join(proc, str(pid), "fd")
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    inodes = []
    for name in sorted(names, key=lambda n: int(n) if n.isdigit() else 1 << 30):
        try:
            target = os.readlink(os.path.join(directory, name))
        except OSError:
            continue
        if target.startswith("socket:[") and target.endswith("]"):
            with contextlib.suppress(ValueError):
                inodes.append(int(target[8:-1]))
    return inodes


class SlotQueues:
    """Accept queue of each slot's listening socket (see the module docstring).

    ``workers`` are (slot, pid) pairs from the scoreboard. Remembers the listening inode
    found for each PID; forgets PIDs that are no longer listed.
    """

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self._inode_of: dict[int, int] = {}  # worker pid -> its listening socket's inode

    def read(
        self, workers: Iterable[tuple[int, int]], sockets: Mapping[int, ListenSocket]
    ) -> dict[int, tuple[int, int | None]]:
        """``{slot: (queue, backlog)}``; a slot whose socket was not found is left out.

        Two sockets for one slot (a reload to another ``bind-to`` runs both for a moment)
        are added up.
        """
        workers = list(workers)
        alive = {pid for _, pid in workers}
        for pid in [p for p in self._inode_of if p not in alive]:
            del self._inode_of[pid]
        by_slot: dict[int, dict[int, ListenSocket]] = {}
        for slot, pid in workers:
            if pid <= 0:
                continue
            inode = self._inode_of.get(pid)
            if inode is None or inode not in sockets:
                inode = next((i for i in socket_inodes(pid, self.proc) if i in sockets), None)
                if inode is None:
                    continue
                self._inode_of[pid] = inode
            by_slot.setdefault(slot, {})[inode] = sockets[inode]
        result: dict[int, tuple[int, int | None]] = {}
        for slot, found in by_slot.items():
            backlogs = [s.backlog for s in found.values()]
            backlog = None if None in backlogs else sum(b for b in backlogs if b is not None)
            result[slot] = (sum(s.queue for s in found.values()), backlog)
        return result


def listen_sockets(proc: str = "/proc") -> dict[int, ListenSocket]:
    """Listening sockets from netlink, or from ``/proc/net/tcp*`` when netlink fails."""
    try:
        return diag_listen_sockets()
    except OSError:
        return proc_listen_sockets(proc)


def kernel_families(
    prefix: str,
    workers: Iterable[tuple[int, int]],
    slot_queues: SlotQueues,
    *,
    proc: str = "/proc",
    counters: Mapping[tuple[str, str], int] | None = None,
    sockets: Mapping[int, ListenSocket] | None = None,
) -> list[FamilyData]:
    """(name, kind, help, samples) of every kernel family of one scrape.

    ``counters`` and ``sockets`` default to reading them now (tests pass their own).
    """
    values = read_tcp_counters(proc) if counters is None else counters
    families: list[FamilyData] = []
    for spec in KERNEL_COUNTERS:
        value = values.get((spec.section, spec.field))
        if value is not None:
            families.append((f"{prefix}_{spec.name}", spec.kind, spec.help, [((), float(value))]))
    workers = list(workers)
    if workers:
        queues = slot_queues.read(workers, listen_sockets(proc) if sockets is None else sockets)
        lengths: list[tuple[Labels, float]] = []
        backlogs: list[tuple[Labels, float]] = []
        for slot, (queue, backlog) in sorted(queues.items()):
            labels: Labels = (("slot", str(slot)),)
            lengths.append((labels, float(queue)))
            if backlog is not None:
                backlogs.append((labels, float(backlog)))
        families.append(
            (
                f"{prefix}_listen_queue_length",
                "gauge",
                "Connections waiting in the accept queue of each worker slot's listening socket.",
                lengths,
            )
        )
        families.append(
            (
                f"{prefix}_listen_queue_backlog",
                "gauge",
                "Most connections the accept queue of each worker slot's listening socket "
                "may hold (the listen backlog as the kernel applied it).",
                backlogs,
            )
        )
    return families
