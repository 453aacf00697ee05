"""The listening sockets of the worker slots (the nginx way).

The supervisor creates one SO_REUSEPORT socket per worker slot before it forks and keeps
it open for as long as the slot exists. The worker of a slot, its replacement after a
crash and the slot's worker of the next generation after a reload all accept from that
same socket, so its accept queue and its place in the kernel's reuseport group survive
restarts and reloads. (One socket inherited by all workers would not be reuseport at all:
every worker would share one queue.)

The supervisor only binds; the first worker of the slot calls ``listen()`` (asyncio does
it in ``create_server``). A slot therefore receives connections only once a worker can
accept them, and ``bind()`` still fails at start when the port is taken.

Only closing a slot's socket (SIGTTOU, a reload to fewer workers or to another bind-to,
shutdown) drops the connections waiting in its queue: the kernel resets them unless
``net.ipv4.tcp_migrate_req = 1``, which moves them to another socket of the group.
"""

from __future__ import annotations

import socket

from mtgworkers.config import HostPort
from mtgworkers.server import bind_reuseport

__all__ = ["ListenError", "bind_slot_socket", "tcp_migrate_req"]


class ListenError(Exception):
    """A slot socket cannot be bound; the message names the address."""


def bind_slot_socket(address: HostPort) -> socket.socket:
    """A bound (not yet listening) non-blocking SO_REUSEPORT TCP socket on ``address``.

    ``[::]`` is dual-stack (IPv4 too), any other IPv6 address IPv6-only, like Go and
    ``mtgworkers.server.create_listener``. Raises :class:`ListenError`.
    """
    try:
        return bind_reuseport(address.host, address.port)
    except OSError as exc:
        raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}") from exc


def tcp_migrate_req() -> int | None:
    """The kernel's ``net.ipv4.tcp_migrate_req`` (None if unknown: old kernel, no /proc)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_migrate_req") as stream:
            return int(stream.read().strip())
    except (OSError, ValueError):
        return None
