"""What happens to connections waiting in a slot's accept queue on reload and on SIGTTOU.

Not a test (pytest does not collect it): an experiment to run by hand, on loopback only::

    python -m tests.supervisor.accept_queue                      # this host's sysctl
    unshare -n sh -c 'ip link set lo up; sysctl -qw net.ipv4.tcp_migrate_req=1;
                      python -m tests.supervisor.accept_queue'   # as root, own netns

Reload: every worker is frozen (SIGSTOP), clients connect and send their ClientHello (the
kernel queues them on the slots' sockets), then SIGHUP. The new generation accepts from
the same sockets, so every queued client must finish its handshake.

SIGTTOU: the worker of the highest slot is frozen, clients connect, SIGTTOU removes the
slot and the frozen worker is killed, which closes the slot's socket for good. Clients
queued on it are reset, unless net.ipv4.tcp_migrate_req = 1 moves them to another slot.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

from tests.supervisor.helpers import wait_until, worker_pids
from tests.support.client import FakeTLSClient
from tests.support.fakedc import FakeDC
from tests.support.proxy import ProxyProcess, free_port, make_config

CLIENTS = 120
KEY = os.urandom(16)
HOST = "queue.test"
SECRET = "ee" + KEY.hex() + HOST.encode().hex()


def _outcome(client: FakeTLSClient) -> str:
    try:
        client.read_server_hello()
        client.send_obfs2_frame()
        client.send(b"ping")
        return "served" if client.recv_exactly(4) == b"ping" else "wrong bytes"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"
    except Exception as exc:
        return type(exc).__name__
    finally:
        client.close()


def _connect_all() -> list[FakeTLSClient]:
    clients = []
    for _ in range(CLIENTS):
        client = FakeTLSClient("127.0.0.1", PORT, KEY, HOST, timeout=5)
        client.send_client_hello()
        clients.append(client)
    return clients


def _tally(clients: list[FakeTLSClient]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for client in clients:
        outcome = _outcome(client)
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def _generation_pids(proxy: ProxyProcess, generation: int) -> dict[int, int]:
    """slot -> pid of the ready workers of ``generation``."""
    return {
        r["slot"]: r["pid"]
        for r in proxy.logs_matching("worker is ready", generation=generation)
        if r["pid"] in worker_pids(proxy)
    }


def reload_experiment(proxy: ProxyProcess) -> dict[str, int]:
    frozen = sorted(worker_pids(proxy))
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    clients = _connect_all()
    mark = proxy.mark()
    os.kill(proxy.pid, signal.SIGHUP)
    proxy.wait_for_log("configuration reloaded", since=mark, timeout=20)
    result = _tally(clients)
    for pid in frozen:
        os.kill(pid, signal.SIGCONT)
    return result


def ttou_experiment(proxy: ProxyProcess, generation: int) -> dict[str, int]:
    slots = _generation_pids(proxy, generation)
    victim = slots[max(slots)]
    os.kill(victim, signal.SIGSTOP)
    clients = _connect_all()
    mark = proxy.mark()
    os.kill(proxy.pid, signal.SIGTTOU)
    proxy.wait_for_log("worker slot removed", since=mark, timeout=10)
    os.kill(victim, signal.SIGKILL)  # its copy was the last one: the socket closes now
    wait_until(lambda: victim not in worker_pids(proxy), 5, "the killed worker")
    return _tally(clients)


def main() -> int:
    global PORT
    PORT = free_port()
    with open("/proc/sys/net/ipv4/tcp_migrate_req") as stream:
        migrate = int(stream.read())
    with FakeDC("echo") as dc, tempfile.TemporaryDirectory() as workdir:
        config = make_config(
            SECRET,
            bind_port=PORT,
            dc_port=dc.port,
            fronting_port=free_port(),
            overrides={"supervisor": {"workers": 3, "graceful-timeout": "2s"}},
        )
        proxy = ProxyProcess(config, Path(workdir)).start()
        try:
            proxy.wait_for_log("proxy is listening", timeout=10)
            result = {
                "kernel": os.uname().release,
                "tcp_migrate_req": migrate,
                "clients_per_experiment": CLIENTS,
                "reload_with_all_workers_frozen": reload_experiment(proxy),
                "sigttou_removing_a_frozen_slot": ttou_experiment(proxy, generation=2),
            }
        finally:
            proxy.kill()
    print(json.dumps(result, indent=2))
    return 0


PORT = 0

if __name__ == "__main__":
    socket.setdefaulttimeout(10)
    sys.exit(main())
