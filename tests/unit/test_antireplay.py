from __future__ import annotations

import hashlib
import math
import mmap
import multiprocessing
import random
import struct
from multiprocessing import shared_memory

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtgworkers.defense.antireplay import HEADER_SIZE, NoopFilter, StableBloomFilter

DEFAULT_MAX_SIZE = 1024 * 1024
DEFAULT_ERROR_RATE = 0.001


def _new(
    max_size: int = 1024, error_rate: float = 0.01, seed: bytes = b"12345678"
) -> tuple[bytearray, StableBloomFilter]:
    buf = bytearray(StableBloomFilter.buffer_size(max_size))
    return buf, StableBloomFilter.create(buf, max_size, error_rate, seed=seed)


def _bits(buf: bytearray | memoryview) -> list[int]:
    cells = bytes(buf[HEADER_SIZE:])
    return [(cells[i >> 3] >> (i & 7)) & 1 for i in range(len(cells) * 8)]


# --- parameters -------------------------------------------------------------------------------


def test_default_parameters() -> None:
    _, sbf = _new(DEFAULT_MAX_SIZE, DEFAULT_ERROR_RATE)
    assert (sbf.m, sbf.k, sbf.p) == (8 * 1024 * 1024, 5, 14)


@pytest.mark.parametrize("max_size", [64, 1024, 65536, 1 << 20, 1 << 24])
@pytest.mark.parametrize("error_rate", [0.5, 0.1, 0.01, 0.001, 0.0001, 1e-9])
def test_parameters_follow_the_formulas(max_size: int, error_rate: float) -> None:
    buf = bytearray(StableBloomFilter.buffer_size(max_size))
    sbf = StableBloomFilter.create(buf, max_size, error_rate)
    m = max_size * 8
    k = max(1, math.ceil(math.log2(1 / error_rate)) // 2)
    p = math.floor(1 / ((1 / (1 - error_rate ** (1 / k)) - 1) * (1 / k - 1 / m)))
    assert sbf.m == m
    assert sbf.k == k
    assert sbf.p == min(max(p, 1), m)


def test_small_error_rate_parameters() -> None:
    _, sbf = _new(1024, 0.01)
    assert (sbf.k, sbf.p) == (3, 10)  # log2(100) = 6.64 -> 7 // 2 = 3


def test_buffer_size() -> None:
    assert StableBloomFilter.buffer_size(1) == HEADER_SIZE + 1
    assert StableBloomFilter.buffer_size(DEFAULT_MAX_SIZE) == HEADER_SIZE + DEFAULT_MAX_SIZE
    with pytest.raises(ValueError):
        StableBloomFilter.buffer_size(0)


def test_header_layout() -> None:
    buf, sbf = _new(1024, 0.01, seed=b"abcdefgh")
    magic, version, k, p, reserved, m, error_rate, key = struct.unpack_from("<8sIIIIQd8s", buf)
    assert magic == b"MTGWSBF\x00"
    assert version == 1
    assert (k, p, m) == (sbf.k, sbf.p, sbf.m)
    assert reserved == 0
    assert error_rate == 0.01
    assert key == b"abcdefgh"
    assert buf[48:HEADER_SIZE] == bytes(16)
    assert buf[HEADER_SIZE:] == bytes(1024)


# --- errors -----------------------------------------------------------------------------------


def test_create_buffer_too_small() -> None:
    with pytest.raises(ValueError, match="too small"):
        StableBloomFilter.create(bytearray(HEADER_SIZE + 1023), 1024, 0.01)
    with pytest.raises(ValueError, match="too small"):
        StableBloomFilter.create(bytearray(10), 1024, 0.01)


def test_create_larger_buffer_is_fine() -> None:
    buf = bytearray(HEADER_SIZE + 2000)
    sbf = StableBloomFilter.create(buf, 1024, 0.01)
    assert sbf.m == 8192
    assert not sbf.test_and_add(b"x")
    assert sbf.test_and_add(b"x")


@pytest.mark.parametrize("error_rate", [0.0, 1.0, -0.1, 2.0])
def test_create_bad_error_rate(error_rate: float) -> None:
    with pytest.raises(ValueError):
        StableBloomFilter.create(bytearray(2000), 1024, error_rate)


def test_create_bad_seed() -> None:
    with pytest.raises(ValueError):
        StableBloomFilter.create(bytearray(2000), 1024, 0.01, seed=b"short")


def test_read_only_buffer() -> None:
    buf, _ = _new()
    with pytest.raises(ValueError, match="writable"):
        StableBloomFilter.create(memoryview(bytes(len(buf))), 1024, 0.01)
    with pytest.raises(ValueError, match="writable"):
        StableBloomFilter.attach(memoryview(bytes(buf)).toreadonly())


def test_attach_uninitialised() -> None:
    with pytest.raises(ValueError, match="magic"):
        StableBloomFilter.attach(bytearray(StableBloomFilter.buffer_size(1024)))
    with pytest.raises(ValueError, match="too small"):
        StableBloomFilter.attach(bytearray(10))


def test_attach_truncated_buffer() -> None:
    buf, _ = _new(1024)
    with pytest.raises(ValueError, match="too small"):
        StableBloomFilter.attach(bytearray(buf[:-1]))


def test_attach_wrong_version_or_corrupt() -> None:
    buf, _ = _new(1024)
    other = bytearray(buf)
    other[8] = 2
    with pytest.raises(ValueError, match="version"):
        StableBloomFilter.attach(other)
    other = bytearray(buf)
    other[24:32] = (12).to_bytes(8, "little")  # m not a multiple of 8
    with pytest.raises(ValueError, match="corrupt"):
        StableBloomFilter.attach(other)


# --- behaviour --------------------------------------------------------------------------------


def test_duplicates_detected_and_fresh_keys_not() -> None:
    _, sbf = _new(DEFAULT_MAX_SIZE, DEFAULT_ERROR_RATE)
    rng = random.Random(1)
    keys = [rng.randbytes(32) for _ in range(200)]
    for key in keys:
        assert sbf.test_and_add(key, rng.getrandbits(64)) is False
        assert sbf.test_and_add(key, rng.getrandbits(64)) is True
    # Recent keys are still there after other insertions.
    assert all(sbf.test_and_add(key, rng.getrandbits(64)) for key in keys[-50:])


@given(key=st.binary(max_size=64), r1=st.integers(min_value=0), r2=st.integers(min_value=0))
def test_immediate_repeat_is_always_seen(key: bytes, r1: int, r2: int) -> None:
    # The test happens before the clearing step, so whatever rnd says, a repeat is caught.
    _, sbf = _new(64, 0.001)
    sbf.test_and_add(key, r1)
    assert sbf.test_and_add(key, r2) is True


def test_random_clearing_without_rnd() -> None:
    buf, sbf = _new(1024, 0.01)
    buf[HEADER_SIZE:] = b"\xff" * 1024
    sbf.test_and_add(b"key")
    # p cells were cleared somewhere, then at most k of them set again.
    assert sbf.p - sbf.k <= _bits(buf).count(0) <= sbf.p


def test_false_positive_rate_at_steady_state() -> None:
    _, sbf = _new(1024, 0.01, seed=b"fp-check")
    rng = random.Random(20240601)
    for _ in range(20000):  # fill up to the stable point
        sbf.test_and_add(rng.randbytes(32), rng.getrandbits(64))
    n = 20000
    false_positives = sum(
        sbf.test_and_add(rng.randbytes(32), rng.getrandbits(64)) for _ in range(n)
    )
    # A stable Bloom filter with these k and p converges to about the requested rate
    # (measured ~1.2 % for 0.01).
    assert 0.004 <= false_positives / n <= 0.025


def test_old_keys_fade_out() -> None:
    _, sbf = _new(64, 0.01)
    rng = random.Random(7)
    sbf.test_and_add(b"old", rng.getrandbits(64))
    for _ in range(5000):
        sbf.test_and_add(rng.randbytes(16), rng.getrandbits(64))
    assert sbf.test_and_add(b"old", rng.getrandbits(64)) is False


def test_index_formula() -> None:
    seed = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    _, sbf = _new(1024, 0.001, seed=seed)
    for key in (b"", b"a", bytes(32), b"\xff" * 100):
        digest = hashlib.blake2b(key, digest_size=8, key=seed).digest()
        value = int.from_bytes(digest, "little")
        lo, hi = value & 0xFFFFFFFF, value >> 32
        assert sbf._indices(key) == [(lo + hi * i) % sbf.m for i in range(sbf.k)]


def test_clear_then_set_with_wrap() -> None:
    buf, sbf = _new(1024, 0.001)
    assert sbf.p == 14
    buf[HEADER_SIZE:] = b"\xff" * 1024
    key = b"session id"
    start = sbf.m - 3

    assert sbf.test_and_add(key, rnd=start + 5 * sbf.m) is True  # rnd is taken modulo m

    cleared = {(start + i) % sbf.m for i in range(sbf.p)}
    assert cleared == {sbf.m - 3, sbf.m - 2, sbf.m - 1, *range(11)}
    expected = [0 if i in cleared else 1 for i in range(sbf.m)]
    for index in sbf._indices(key):
        expected[index] = 1
    assert _bits(buf) == expected


@pytest.mark.parametrize("start", [0, 1, 7, 8, 13, 8189, 8191])
def test_clear_run_positions(start: int) -> None:
    buf, sbf = _new(1024, 0.01)
    assert (sbf.m, sbf.p) == (8192, 10)
    buf[HEADER_SIZE:] = b"\xff" * 1024
    indices = set(sbf._indices(b"k"))
    sbf.test_and_add(b"k", rnd=start)
    bits = _bits(buf)
    for i in range(sbf.m):
        in_run = (i - start) % sbf.m < sbf.p
        assert bits[i] == (0 if in_run and i not in indices else 1), i


def test_seed_changes_positions() -> None:
    buf_a, a = _new(1024, 0.01, seed=b"aaaaaaaa")
    buf_b, b = _new(1024, 0.01, seed=b"bbbbbbbb")
    assert a._indices(b"key") != b._indices(b"key")
    a.test_and_add(b"key", 0)
    b.test_and_add(b"key", 0)
    assert buf_a[HEADER_SIZE:] != buf_b[HEADER_SIZE:]


def test_random_seed_when_not_given() -> None:
    buf_a = bytearray(StableBloomFilter.buffer_size(64))
    buf_b = bytearray(StableBloomFilter.buffer_size(64))
    StableBloomFilter.create(buf_a, 64, 0.01)
    StableBloomFilter.create(buf_b, 64, 0.01)
    assert buf_a[40:48] != buf_b[40:48]


# --- sharing ----------------------------------------------------------------------------------


def test_attach_sees_insertions_both_ways() -> None:
    buf, first = _new(1024, 0.001)
    second = StableBloomFilter.attach(buf)
    assert (second.m, second.k, second.p) == (first.m, first.k, first.p)

    assert first.test_and_add(b"one", 0) is False
    assert second.test_and_add(b"one", 100) is True
    assert second.test_and_add(b"two", 200) is False
    assert first.test_and_add(b"two", 300) is True


def test_create_resets_an_existing_filter() -> None:
    buf, first = _new(1024, 0.01)
    first.test_and_add(b"one")
    again = StableBloomFilter.create(buf, 1024, 0.01, seed=b"12345678")
    assert again.test_and_add(b"one") is False


def test_shared_memory_buffer() -> None:
    size = StableBloomFilter.buffer_size(4096)
    shm = shared_memory.SharedMemory(create=True, size=size)
    try:
        assert shm.buf is not None
        first = StableBloomFilter.create(shm.buf, 4096, 0.001)
        first.test_and_add(b"hello")
        other = shared_memory.SharedMemory(name=shm.name)
        try:
            assert other.buf is not None
            second = StableBloomFilter.attach(other.buf)
            assert second.test_and_add(b"hello") is True
            del second
        finally:
            other.close()
        del first
    finally:
        shm.close()
        shm.unlink()


def _child(mm: mmap.mmap, queue: multiprocessing.Queue[bool]) -> None:
    sbf = StableBloomFilter.attach(mm)
    queue.put(sbf.test_and_add(b"from parent"))
    sbf.test_and_add(b"from child")


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs fork to share an mmap"
)
def test_attach_in_another_process() -> None:
    mm = mmap.mmap(-1, StableBloomFilter.buffer_size(4096))
    sbf = StableBloomFilter.create(mm, 4096, 0.001)
    sbf.test_and_add(b"from parent")

    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[bool] = ctx.Queue()
    child = ctx.Process(target=_child, args=(mm, queue))
    child.start()
    seen_in_child = queue.get(timeout=10)
    child.join(timeout=10)

    assert child.exitcode == 0
    assert seen_in_child is True
    assert sbf.test_and_add(b"from child") is True


# --- noop -------------------------------------------------------------------------------------


def test_noop_filter() -> None:
    noop = NoopFilter()
    assert noop.test_and_add(b"x") is False
    assert noop.test_and_add(b"x") is False
    assert noop.test_and_add(b"x", rnd=5) is False
