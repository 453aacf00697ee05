"""Shared pieces of the benchmark: wire helpers (fast paths for the load side), the
per-connection control header, the byte pattern every payload is checked against, and
process helpers (pinning, CPU/RSS/fd accounting of whole process trees, clean teardown).

The client side of the protocol reuses the independent test kit (``tests.support``) for the
parts that run once per connection (ClientHello template, obfuscated2 frames); what runs per
chunk (TLS records, pattern checks) is written here for speed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import queue
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # ``python bench/run.py`` and child processes
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.client import build_client_hello  # noqa: E402
from tests.support.wire import obfs2_client_frame, obfs2_dc_accept  # noqa: E402

__all__ = [
    "CCS_RECORD",
    "MAX_RECORD_PAYLOAD",
    "ChildChannel",
    "HelloFactory",
    "RecordStream",
    "obfs2_client_frame",
    "obfs2_dc_accept",
]

MAX_RECORD_PAYLOAD = 16379
CCS_RECORD = b"\x14\x03\x03\x00\x01\x01"
RANDOM_OFFSET = 11
FRAME_LEN = 64
TAG_PADDED = b"\xdd\xdd\xdd\xdd"

# -- the byte pattern ---------------------------------------------------------------------
# Every payload byte at stream offset ``o`` is PATTERN[o % PERIOD]. A prime period makes a
# lost, repeated or reordered chunk (whose size is a power of two or a record size) show up.
PERIOD = 65521
MAX_PIECE = 1 << 18  # longest slice compared in one go
_BLOCK = random.Random(20240517).randbytes(PERIOD)
PATTERN = _BLOCK * ((PERIOD + MAX_PIECE) // PERIOD + 1)


def pattern_at(offset: int, n: int) -> bytes:
    """Pattern bytes [offset, offset + n) for n <= MAX_PIECE."""
    start = offset % PERIOD
    return PATTERN[start : start + n]


def pattern_ok(offset: int, data: bytes | memoryview) -> bool:
    """True when ``data`` equals the pattern at stream ``offset`` (any length)."""
    n = len(data)
    if n <= MAX_PIECE:
        start = offset % PERIOD
        return PATTERN[start : start + n] == data
    view = memoryview(data)
    for pos in range(0, n, MAX_PIECE):
        piece = view[pos : pos + MAX_PIECE]
        start = (offset + pos) % PERIOD
        if PATTERN[start : start + len(piece)] != piece:
            return False
    return True


# -- control header -----------------------------------------------------------------------
# The first 16 plaintext payload bytes after the client's obfuscated2 frame tell the fake DC
# what to do. The proxy relays them like any other byte (dd framing is not parsed).
CONTROL = struct.Struct("<4sBbHQ")  # magic, mode, dc, flags, count
CONTROL_MAGIC = b"MTGB"
MODE_ECHO = ord("E")  # echo; count > 0: close after echoing count bytes
MODE_SINK = ord("S")  # verify and drop; ack the verified total every `count` bytes
MODE_SOURCE = ord("K")  # send pattern bytes; count > 0: that many, then close
ACK = struct.Struct("<Q")
# Load generator counters shared with the runner through a small mmap'd file:
# rx, tx, completed, established, failed, corrupt, open connections, reserved.
COUNTERS = struct.Struct("<8Q")
COUNTER_NAMES = ("rx", "tx", "completed", "established", "failed", "corrupt", "open")


def control_header(mode: int, dc: int, count: int = 0) -> bytes:
    """The 16-byte header a load client sends first (plaintext, before encryption)."""
    return CONTROL.pack(CONTROL_MAGIC, mode, dc, 0, count)


# -- TLS records ---------------------------------------------------------------------------
class RecordError(Exception):
    """The peer's TLS record layer is wrong (version, size)."""


class RecordStream:
    """Incremental reader of ``type 03 03 len payload`` records.

    ``feed`` returns the ApplicationData payload pieces (views into the fed chunk) in
    order; other record types are skipped. Records larger than ``max_payload`` raise.
    """

    __slots__ = ("head", "keep", "left", "max_payload")

    def __init__(self, max_payload: int = MAX_RECORD_PAYLOAD) -> None:
        self.head = b""
        self.left = 0
        self.keep = False
        self.max_payload = max_payload

    def feed(self, data: bytes) -> list[memoryview]:
        out: list[memoryview] = []
        view = memoryview(data)
        n = len(data)
        pos = 0
        left = self.left
        keep = self.keep
        while pos < n:
            if left:
                end = pos + left
                if end >= n:
                    if keep:
                        out.append(view[pos:])
                    left = end - n
                    break
                if keep:
                    out.append(view[pos:end])
                pos = end
                left = 0
                continue
            if self.head or n - pos < 5:
                need = 5 - len(self.head)
                self.head += data[pos : pos + need]
                pos += need
                if len(self.head) < 5:
                    break
                header = self.head
                self.head = b""
            else:
                header = data[pos : pos + 5]
                pos += 5
            if header[1] != 3 or header[2] != 3:
                raise RecordError(f"record version must be 03 03, got header {header.hex()}")
            left = (header[3] << 8) | header[4]
            keep = header[0] == 0x17
            if keep and left > self.max_payload:
                raise RecordError(f"record payload {left} exceeds {self.max_payload}")
        self.left = left
        self.keep = keep
        return out


def wrap(data: bytes) -> bytes:
    """ApplicationData records of at most MAX_RECORD_PAYLOAD bytes around ``data``."""
    n = len(data)
    if n <= MAX_RECORD_PAYLOAD:
        return b"\x17\x03\x03" + n.to_bytes(2, "big") + data
    parts: list[bytes | memoryview] = []
    view = memoryview(data)
    for pos in range(0, n, MAX_RECORD_PAYLOAD):
        piece = view[pos : pos + MAX_RECORD_PAYLOAD]
        parts.append(b"\x17\x03\x03" + len(piece).to_bytes(2, "big"))
        parts.append(piece)
    return b"".join(parts)


# -- FakeTLS client side -------------------------------------------------------------------
def parse_secret(text: str) -> tuple[bytes, str]:
    """(16-byte key, host) of an ``ee`` hex secret."""
    raw = bytes.fromhex(text)
    if len(raw) < 18 or raw[0] != 0xEE:
        raise ValueError("benchmark secrets are 'ee' hex secrets with a host name")
    return raw[1:17], raw[17:].decode()


class HelloFactory:
    """Makes valid ClientHello records fast: one template built by the test kit, then per
    connection a fresh session id, one HMAC and the timestamp XOR (about 3 us)."""

    def __init__(self, key: bytes, host: str) -> None:
        self.key = key
        template = bytearray(
            build_client_hello(
                key, host, timestamp=0, session_id=bytes(32), key_share=bytes(range(1, 33))
            )
        )
        if template[43] != 32:
            raise ValueError("unexpected ClientHello template layout")
        template[RANDOM_OFFSET : RANDOM_OFFSET + 32] = bytes(32)
        self.template = bytes(template)

    def make(self, now: float | None = None) -> tuple[bytes, bytes, bytes]:
        """Return (record, client_random, session_id)."""
        session_id = os.urandom(32)
        t = self.template
        record = t[:44] + session_id + t[76:]
        mac = hmac.digest(self.key, record, "sha256")
        ts = int(time.time() if now is None else now) & 0xFFFFFFFF
        client_random = mac[:28] + (int.from_bytes(mac[28:], "little") ^ ts).to_bytes(4, "little")
        return t[:11] + client_random + record[43:], client_random, session_id


def welcome_length(buf: bytes | bytearray) -> int | None:
    """Length of a complete ServerHello + CCS + ApplicationData packet at the start of
    ``buf``, None if more bytes are needed. Raises RecordError on a wrong layout."""
    if len(buf) < 5:
        return None
    if buf[0] != 0x16 or buf[1] != 3 or buf[2] != 3:
        raise RecordError(f"welcome packet must start 16 03 03, got {bytes(buf[:3]).hex()}")
    ccs = 5 + ((buf[3] << 8) | buf[4])
    if len(buf) < ccs + 11:
        return None
    if buf[ccs : ccs + 6] != CCS_RECORD:
        raise RecordError("ChangeCipherSpec must follow the ServerHello")
    app = ccs + 6
    if buf[app] != 0x17 or buf[app + 1] != 3 or buf[app + 2] != 3:
        raise RecordError("one ApplicationData record must follow the ChangeCipherSpec")
    end = app + 5 + ((buf[app + 3] << 8) | buf[app + 4])
    return end if len(buf) >= end else None


def check_welcome(
    packet: bytes, client_random: bytes, session_id: bytes, key: bytes | None
) -> str | None:
    """Problem with a welcome packet (echoed session id; HMAC when ``key``), or None."""
    if packet[43] != len(session_id) or packet[44 : 44 + len(session_id)] != session_id:
        return "ServerHello does not echo the session id"
    if key is not None:
        zeroed = packet[:RANDOM_OFFSET] + bytes(32) + packet[RANDOM_OFFSET + 32 :]
        mac = hmac.digest(key, client_random + zeroed, "sha256")
        if not hmac.compare_digest(mac, packet[RANDOM_OFFSET : RANDOM_OFFSET + 32]):
            return "server random is not HMAC(key, client_random || packet)"
    return None


def aes_ctr(key: bytes, iv: bytes) -> CipherContext:
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()


def proxy_side_frame(frame: bytes, key: bytes) -> tuple[bytes, int, CipherContext, CipherContext]:
    """Decode a client's frame the way a proxy does (with the secret ``key``).

    Returns (tag, dc, decryptor past the frame, encryptor at offset 0). Used by the fake DC
    behind the no-crypto baseline relay, which forwards the client's frame unchanged.
    """
    dec = aes_ctr(hashlib.sha256(frame[8:40] + key).digest(), frame[40:56])
    rev = frame[8:56][::-1]
    enc = aes_ctr(hashlib.sha256(rev[0:32] + key).digest(), rev[32:48])
    plain = dec.update(frame)
    return plain[56:60], int.from_bytes(plain[60:62], "little", signed=True), dec, enc


# -- processes -----------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def listening_ports() -> set[int]:
    """TCP ports in LISTEN state (reads /proc; opens no connection)."""
    ports: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A":
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except (FileNotFoundError, StopIteration):
            continue
    return ports


def wait_listening(ports: Sequence[int], proc: subprocess.Popen[Any], timeout: float) -> None:
    """Wait until every port listens; RuntimeError if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening")
        if set(ports) <= listening_ports():
            return
        time.sleep(0.02)
    raise RuntimeError(f"ports {list(ports)} not listening after {timeout:.0f} s")


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process tree, including descendants that already
    exited and were reaped (the kernel adds those to their reaper's children times), so
    the total never goes down when a supervisor retires a worker."""
    total = 0.0
    for proc in process_tree(pid):
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def tree_memory(pid: int) -> tuple[int, int, int]:
    """(RSS bytes, open fds, processes) summed over a process tree."""
    rss = fds = count = 0
    for proc in process_tree(pid):
        with contextlib.suppress(psutil.Error):
            rss += proc.memory_info().rss
            fds += proc.num_fds()
            count += 1
    return rss, fds, count


def cpu_busy_ticks() -> dict[int, tuple[int, int]]:
    """Per CPU (busy, total) clock ticks since boot, from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3].isdigit():
                    name, *fields = line.split()
                    ticks = [int(x) for x in fields[:8]]
                    idle = ticks[3] + ticks[4]
                    out[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    except OSError:
        pass
    return out


def busy_pct(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpus: Sequence[int]
) -> float:
    """Average busy percentage of ``cpus`` between two cpu_busy_ticks() samples."""
    busy = total = 0
    for cpu in cpus:
        if cpu in before and cpu in after:
            busy += after[cpu][0] - before[cpu][0]
            total += after[cpu][1] - before[cpu][1]
    return 100.0 * busy / total if total else float("nan")


def pin(pid: int, cpus: Sequence[int] | None) -> None:
    """Pin ``pid`` (and its future children) to ``cpus``; no-op when None."""
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, set(cpus))


def taskset_prefix(cpus: Sequence[int] | None) -> list[str]:
    """``taskset -c LIST`` when available, so the process is pinned from its first
    instruction (the fallback pins right after spawning)."""
    if not cpus:
        return []
    for path in ("/usr/bin/taskset", "/bin/taskset"):
        if os.path.exists(path):
            return [path, "-c", ",".join(str(c) for c in cpus)]
    return []


def group_members(pgid: int) -> list[psutil.Process]:
    """Live processes of process group ``pgid`` (orphans included)."""
    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
    return members


def kill_tree(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """End everything ``proc`` started: its process tree and its process group (we start
    every child in a new session, so orphans whose parent already died are found there).
    SIGTERM first, SIGKILL after ``timeout``. Never raises."""
    members = {p.pid: p for p in process_tree(proc.pid) + group_members(proc.pid)}
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    for member in members.values():
        with contextlib.suppress(psutil.Error):
            member.terminate()
    _, alive = psutil.wait_procs(list(members.values()), timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for member in alive:
        with contextlib.suppress(psutil.Error):
            member.kill()
    psutil.wait_procs(alive, timeout=timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


class ChildChannel:
    """A helper process spoken to with JSON lines on stdin/stdout.

    Lines are collected by a thread so ``recv`` can time out. stderr goes to ``log_path``.
    The process runs in its own session (process group) so teardown reaches all of it.
    """

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, cpus: Sequence[int] | None = None
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [*taskset_prefix(cpus), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,
        )
        pin(self.proc.pid, cpus)
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                self._lines.put(json.loads(raw))
            except ValueError:
                continue
        self._lines.put(None)

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float) -> dict[str, Any]:
        """Next JSON line; RuntimeError on EOF (process died) or time-out."""
        try:
            line = self._lines.get(timeout=max(timeout, 0.001))
        except queue.Empty:
            raise RuntimeError(f"no answer from {self.describe()} in {timeout:.1f} s") from None
        if line is None:
            self.proc.wait(timeout=5)
            raise RuntimeError(f"{self.describe()} exited with code {self.proc.returncode}")
        return line

    def describe(self) -> str:
        return f"{self.name} (pid {self.proc.pid})"

    def tail(self, n: int = 20) -> str:
        """Last lines of the child's stderr log (for error messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        kill_tree(self.proc, timeout=3.0)
        self._log.close()


def iter_chunks(items: Sequence[Any], parts: int) -> Iterator[list[Any]]:
    """Split ``items`` into ``parts`` nearly equal lists (order kept)."""
    base, extra = divmod(len(items), parts)
    pos = 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        yield list(items[pos : pos + size])
        pos += size


def split_count(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` nearly equal non-negative integers."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
