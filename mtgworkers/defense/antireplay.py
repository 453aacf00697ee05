"""Anti-replay cache: a stable Bloom filter over a caller-provided buffer (docs/protocol.md §7).

A stable Bloom filter (Deng & Rafiei, 2006) is a Bloom filter that forgets: every insertion
first clears ``p`` consecutive cells at a random position, so the share of set cells stays
bounded however many keys go in, and old keys fade out. Parameters are computed like mtg
(library BoomFilters, one-bit cells):

- ``m = max_size * 8`` cells,
- ``k = ceil(log2(1 / error_rate)) // 2`` (at least 1),
- ``p = floor(1 / ((1 / (1 - error_rate ** (1 / k)) - 1) * (1 / k - 1 / m)))`` (at least 1, at
  most ``m``).

The hash is keyed BLAKE2b with an 8-byte digest instead of mtg's XXH64 (no extra dependency,
and a random key makes the cell positions unpredictable); the digest is read as a
little-endian u64, ``hi``/``lo`` are its upper/lower 32 bits and the cells of a key are
``(lo + hi * i) % m`` for ``i`` in ``0 .. k-1``.

All state lives in the buffer, so any number of processes can :meth:`StableBloomFilter.attach`
to the same shared memory and see one filter. The filter itself takes no lock: concurrent
callers (threads or processes) must serialise :meth:`~StableBloomFilter.test_and_add`
themselves, or two simultaneous replays of one key may both pass.

Buffer layout (all integers little-endian)::

    offset  size  field
         0     8  magic  b"MTGWSBF\\0"      (written last by create(), so a half-initialised
                                             buffer is never attached)
         8     4  u32 layout version (1)
        12     4  u32 k  (cells per key)
        16     4  u32 p  (cells cleared per insertion)
        20     4  u32 reserved, 0
        24     8  u64 m  (number of cells, a multiple of 8)
        32     8  f64 error_rate (informational)
        40     8  hash key (BLAKE2b key)
        48    16  reserved, 0
        64   m/8  cell bitmap: cell i is bit (i % 8) of byte 64 + i // 8
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct
from random import getrandbits as _getrandbits
from typing import TypeAlias

__all__ = ["HEADER_SIZE", "NoopFilter", "StableBloomFilter", "WritableBuffer"]

WritableBuffer: TypeAlias = bytearray | memoryview | mmap.mmap

MAGIC = b"MTGWSBF\x00"
VERSION = 1
HEADER_SIZE = 64
HASH_KEY_SIZE = 8
_HEADER = struct.Struct("<8sIIIIQd8s16x")
assert _HEADER.size == HEADER_SIZE

# Masks to clear bits [bit, bit + n) of one byte, indexed [bit][n].
_CLEAR_MASKS = [[~(((1 << n) - 1) << bit) & 0xFF for n in range(9)] for bit in range(8)]


def _params(max_size: int, error_rate: float) -> tuple[int, int, int]:
    """(m, k, p) for a filter of ``max_size`` bytes, as mtg/BoomFilters compute them."""
    m = max_size * 8
    k = max(1, math.ceil(math.log2(1 / error_rate)) // 2)
    denominator = (1 / (1 - error_rate ** (1 / k)) - 1) * (1 / k - 1 / m)
    p = max(1, int(1 / denominator)) if denominator > 0 else 1
    # More than m would clear some cells twice; the effect is the same as m.
    return m, k, min(p, m)


class StableBloomFilter:
    """Stable Bloom filter stored entirely in a writable buffer (layout in the module doc).

    Build one with :meth:`create` (initialises the buffer) or :meth:`attach` (uses an already
    initialised buffer, e.g. shared memory set up by another process).
    """

    __slots__ = ("_cells", "_hasher", "error_rate", "k", "m", "p")

    def __init__(
        self, cells: memoryview, m: int, k: int, p: int, error_rate: float, hash_key: bytes
    ) -> None:
        """Internal: use :meth:`create` or :meth:`attach`."""
        self._cells = cells
        self._hasher = hashlib.blake2b(digest_size=8, key=hash_key)
        self.m = m
        self.k = k
        self.p = p
        self.error_rate = error_rate

    @staticmethod
    def buffer_size(max_size: int) -> int:
        """Bytes a buffer needs for a filter of ``max_size`` bytes of cells (header included).

        Raises ValueError if ``max_size`` is not positive.
        """
        if max_size < 1:
            raise ValueError(f"max_size must be positive, got {max_size}")
        return HEADER_SIZE + max_size

    @classmethod
    def create(
        cls,
        buf: WritableBuffer,
        max_size: int,
        error_rate: float,
        *,
        seed: bytes | None = None,
    ) -> StableBloomFilter:
        """Initialise ``buf`` as an empty filter and return it.

        ``max_size`` is the size of the cell bitmap in bytes (``m = max_size * 8`` cells),
        ``error_rate`` the target false-positive rate (0 < rate < 1), ``seed`` the 8-byte hash
        key (random when None). Raises ValueError on bad parameters, or if ``buf`` is
        read-only or smaller than :meth:`buffer_size`.
        """
        if not 0 < error_rate < 1:
            raise ValueError(f"error_rate must be between 0 and 1, got {error_rate}")
        size = cls.buffer_size(max_size)
        view = _writable_view(buf)
        if len(view) < size:
            raise ValueError(f"buffer of {len(view)} bytes is too small, {size} are needed")
        if seed is None:
            seed = os.urandom(HASH_KEY_SIZE)
        if len(seed) != HASH_KEY_SIZE:
            raise ValueError(f"seed must be {HASH_KEY_SIZE} bytes, got {len(seed)}")

        m, k, p = _params(max_size, error_rate)
        view[:8] = bytes(8)  # invalidate first: attach() must not see a half-written filter
        view[HEADER_SIZE:size] = bytes(max_size)
        header = _HEADER.pack(MAGIC, VERSION, k, p, 0, m, error_rate, seed)
        view[8:HEADER_SIZE] = header[8:]
        view[:8] = MAGIC
        return cls(view[HEADER_SIZE:size], m, k, p, error_rate, seed)

    @classmethod
    def attach(cls, buf: WritableBuffer) -> StableBloomFilter:
        """Use a buffer that :meth:`create` initialised (possibly in another process).

        Raises ValueError if the buffer is read-only, too small, or holds no filter of this
        layout version.
        """
        view = _writable_view(buf)
        if len(view) < HEADER_SIZE:
            raise ValueError(f"buffer of {len(view)} bytes is too small for a filter header")
        magic, version, k, p, _, m, error_rate, seed = _HEADER.unpack(view[:HEADER_SIZE])
        if magic != MAGIC:
            raise ValueError("buffer does not hold an anti-replay filter (bad magic)")
        if version != VERSION:
            raise ValueError(f"unsupported anti-replay filter layout version {version}")
        if m == 0 or m % 8 or k < 1 or not 1 <= p <= m:
            raise ValueError("corrupt anti-replay filter header")
        size = HEADER_SIZE + m // 8
        if len(view) < size:
            raise ValueError(f"buffer of {len(view)} bytes is too small, {size} are needed")
        return cls(view[HEADER_SIZE:size], m, k, p, error_rate, seed)

    def _indices(self, key: bytes) -> list[int]:
        hasher = self._hasher.copy()
        hasher.update(key)
        value = int.from_bytes(hasher.digest(), "little")
        m = self.m
        # (lo + hi * i) % m, computed incrementally
        index = (value & 0xFFFFFFFF) % m
        step = (value >> 32) % m
        indices = []
        for _ in range(self.k):
            indices.append(index)
            index = (index + step) % m
        return indices

    def test_and_add(self, key: bytes, rnd: int | None = None) -> bool:
        """Insert ``key``; return True if it was (probably) inserted before, i.e. a replay.

        ``rnd`` picks where the ``p`` cells to clear start (``rnd % m``); None = random. Tests
        pass it to be deterministic. Never raises for any ``key`` bytes.
        """
        cells = self._cells
        indices = self._indices(key)
        seen = True
        for index in indices:
            if not cells[index >> 3] & (1 << (index & 7)):
                seen = False
                break

        # Make room: clear p consecutive cells (wrapping) starting at a random cell.
        m = self.m
        position = (_getrandbits(64) if rnd is None else rnd) % m
        remaining = self.p
        while remaining:
            bit = position & 7
            n = 8 - bit if remaining > 8 - bit else remaining
            cells[position >> 3] &= _CLEAR_MASKS[bit][n]
            remaining -= n
            position += n
            if position == m:  # m is a multiple of 8, so a wrap lands on a byte boundary
                position = 0

        for index in indices:
            cells[index >> 3] |= 1 << (index & 7)
        return seen


class NoopFilter:
    """The anti-replay cache when the feature is disabled: nothing is ever a replay."""

    __slots__ = ()

    def test_and_add(self, key: bytes, rnd: int | None = None) -> bool:
        """Always False."""
        return False


def _writable_view(buf: WritableBuffer) -> memoryview:
    view = memoryview(buf)
    if view.readonly:
        raise ValueError("anti-replay buffer must be writable")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view
