"""The doppelganger's statistics, without I/O: record timing and the ServerHello's size.

A censor that watches live connections compares the proxy with the website it claims to
be: how long the gaps between TLS records to the client are, how large the records are,
and how large the encrypted handshake record of the ServerHello is. The doppelganger
answers as mtg does (``9seconds/mtg`` ``mtglib/internal/doppel``):

- **Pacing.** Every ApplicationData record to a Telegram client leaves after a delay
  drawn from a Weibull distribution, ``X = lambda * (-ln U)^(1/k)`` milliseconds with U
  uniform on (0, 1]. Until something is learned, k and lambda are mtg's, measured on ok.ru:
  :data:`DEFAULT_K`, :data:`DEFAULT_LAMBDA_MS` (mean gap ~6.7 ms, so one connection moves
  at most ~2.4 MB/s in 16 KiB records).
- **Learning.** Scouting raids fetch the configured ``urls`` over HTTPS and record when
  each TLS record arrives; :func:`record_gaps` turns one fetch into gaps, and once there
  are :data:`MIN_GAPS_TO_FIT` of them :func:`fit_weibull` refits k and lambda by maximum
  likelihood (mtg's bisection on the shape equation, the same bounds and step count).
- **Noise calibration.** The same fetch measures the site's encrypted handshake (the
  ApplicationData bytes between its ChangeCipherSpec and our first write:
  :func:`handshake_size`). :func:`noise_params` turns the measured sizes into a mean and a
  jitter, and :func:`noise_length` draws the length of the ServerHello's noise record.

:class:`SharedState` keeps what was learned in a fixed layout over any writable buffer,
so one process learns and every worker paces with the result (the supervisor puts it in
shared memory; a lone worker uses a ``bytearray``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import mmap

    Buffer = memoryview | bytearray | mmap.mmap

__all__ = [
    "DEFAULT_K",
    "DEFAULT_LAMBDA_MS",
    "MAX_SAMPLES",
    "MIN_GAPS_TO_FIT",
    "MIN_SIZES_TO_CALIBRATE",
    "Learned",
    "NoiseParams",
    "Record",
    "SharedState",
    "WeibullParams",
    "fit_weibull",
    "handshake_size",
    "noise_length",
    "noise_params",
    "record_gaps",
    "weibull_delay",
]

# mtg's constants (mtglib/internal/doppel/stats.go, ganger.go).
DEFAULT_K: Final = 0.37846373895785335
DEFAULT_LAMBDA_MS: Final = 1.73177086015485
MIN_GAPS_TO_FIT: Final = 100
MIN_SIZES_TO_CALIBRATE: Final = 3
MAX_SAMPLES: Final = 4096  # gaps and sizes kept, the newest
FIT_BISECTIONS: Final = 70
FIT_LOW_K: Final = 0.01
FIT_HIGH_K: Final = 10.0
MIN_JITTER: Final = 100
MIN_NOISE: Final = 1000

# TLS record types a scout sees
CHANGE_CIPHER_SPEC: Final = 0x14
APPLICATION_DATA: Final = 0x17


@dataclass(frozen=True, slots=True)
class WeibullParams:
    """Shape ``k`` and scale ``lambda_ms`` (milliseconds) of the gaps between records."""

    k: float = DEFAULT_K
    lambda_ms: float = DEFAULT_LAMBDA_MS

    @property
    def mean_ms(self) -> float:
        """The mean gap: ``lambda * Gamma(1 + 1/k)``."""
        return self.lambda_ms * math.gamma(1.0 + 1.0 / self.k)


@dataclass(frozen=True, slots=True)
class NoiseParams:
    """Length of the ServerHello's noise record: ``mean`` +- ``jitter`` bytes."""

    mean: int
    jitter: int


@dataclass(frozen=True, slots=True)
class Record:
    """One TLS record a scout received: type, payload length, arrival (seconds)."""

    type: int
    length: int
    at: float


def weibull_delay(params: WeibullParams, uniform: float) -> float:
    """The delay in seconds for ``uniform`` drawn from [0, 1) (``random.random()``)."""
    u = 1.0 - uniform  # (0, 1]: no log(0)
    return params.lambda_ms * (-math.log(u)) ** (1.0 / params.k) / 1000.0


def fit_weibull(gaps_ms: Sequence[float]) -> WeibullParams:
    """Maximum-likelihood k and lambda of ``gaps_ms`` (positive milliseconds).

    k solves ``1/k + mean(ln x) - sum(x^k ln x) / sum(x^k) = 0``, found by bisection on
    [0.01, 10] in 70 steps as mtg does; then ``lambda = (mean(x^k))^(1/k)``. Gaps that are
    not positive are left out (a log of them has no meaning). Raises ValueError when no
    positive gap is left.
    """
    xs = [x for x in gaps_ms if x > 0.0]
    if not xs:
        raise ValueError("no positive gaps to fit")
    n = float(len(xs))
    logs = [math.log(x) for x in xs]
    mean_log = sum(logs) / n
    low, high = FIT_LOW_K, FIT_HIGH_K
    for _ in range(FIT_BISECTIONS):
        mid = (low + high) / 2.0
        powers = [x**mid for x in xs]
        total = sum(powers)
        weighted = sum(p * lg for p, lg in zip(powers, logs, strict=True))
        if 1.0 / mid + mean_log - weighted / total > 0:
            low = mid
        else:
            high = mid
    k = (low + high) / 2.0
    lam = (sum(x**k for x in xs) / n) ** (1.0 / k)
    return WeibullParams(k, lam)


def record_gaps(records: Sequence[Record]) -> list[float]:
    """Gaps in milliseconds between the ApplicationData records of one fetch.

    The first one is measured from the record before it (the end of the server's
    handshake), as mtg does; a fetch whose first record is ApplicationData starts at 0.
    """
    gaps: list[float] = []
    last: float | None = None
    for index, record in enumerate(records):
        if record.type != APPLICATION_DATA:
            continue
        if last is None:
            last = records[index - 1].at if index else record.at
        gaps.append((record.at - last) * 1000.0)
        last = record.at
    return gaps


def handshake_size(records: Sequence[Record], first_write: int | None) -> int:
    """The payload bytes of ApplicationData records after the server's ChangeCipherSpec and
    before ``first_write`` (the index of the first record received after the client sent
    its request): the site's encrypted handshake (certificates, signatures). 0 if none."""
    end = len(records) if first_write is None else first_write
    seen_ccs = False
    size = 0
    for record in records[:end]:
        if record.type == CHANGE_CIPHER_SPEC:
            seen_ccs = True
        elif seen_ccs and record.type == APPLICATION_DATA:
            size += record.length
    return size


def noise_params(sizes: Sequence[int]) -> NoiseParams | None:
    """mtg's calibration: the integer mean of the measured sizes, and the largest distance
    from it (at least :data:`MIN_JITTER`). None below :data:`MIN_SIZES_TO_CALIBRATE`."""
    if len(sizes) < MIN_SIZES_TO_CALIBRATE:
        return None
    mean = sum(sizes) // len(sizes)
    jitter = max(MIN_JITTER, max(abs(size - mean) for size in sizes))
    return NoiseParams(mean, jitter)


def noise_length(params: NoiseParams | None, randbelow: Callable[[int], int]) -> int | None:
    """The length of one ServerHello noise record: ``mean - jitter + randbelow(2 jitter)``,
    at least :data:`MIN_NOISE`; None without calibration (the caller's fallback)."""
    if params is None or params.mean <= 0 or params.jitter <= 0:
        return None
    return max(MIN_NOISE, params.mean - params.jitter + randbelow(2 * params.jitter))


@dataclass(frozen=True, slots=True)
class Learned:
    """A snapshot of :class:`SharedState`."""

    weibull: WeibullParams
    noise: NoiseParams | None
    gaps: int  # gap samples held
    sizes: int  # handshake size samples held
    fitted_at: float  # UNIX time of the last refit of k and lambda; 0: never
    calibrated_at: float  # UNIX time of the last noise calibration; 0: never
    raid_at: float  # UNIX time the last raid started; 0: never

    def as_json(self, now: float) -> dict[str, object]:
        """For doctor --json: k, lambda, mean, noise, samples and ages in seconds."""
        return {
            "k": self.weibull.k,
            "lambda_ms": self.weibull.lambda_ms,
            "mean_gap_ms": self.weibull.mean_ms,
            "learned": self.fitted_at > 0,
            "gap_samples": self.gaps,
            "noise_mean": self.noise.mean if self.noise else None,
            "noise_jitter": self.noise.jitter if self.noise else None,
            "size_samples": self.sizes,
            "fitted_age_seconds": now - self.fitted_at if self.fitted_at else None,
            "calibrated_age_seconds": now - self.calibrated_at if self.calibrated_at else None,
            "raid_age_seconds": now - self.raid_at if self.raid_at else None,
        }


class SharedState:
    """What the doppelganger learned, in a fixed little-endian layout over a buffer::

        offset      size   field
             0         8   magic b"MTGWDOPL"
             8         4   u32 layout version (1)
            12         4   u32 sequence: odd while the writer is changing the fields
            16         8   f64 k
            24         8   f64 lambda (ms)
            32         8   f64 fitted at (UNIX time; 0 = never, k/lambda are the defaults)
            40         4   u32 noise mean (0 = not calibrated)
            44         4   u32 noise jitter
            48         8   f64 calibrated at
            56         8   f64 raid started at
            64         4   u32 gap samples held (<= 4096)
            68         4   u32 next gap slot (ring)
            72         4   u32 size samples held (<= 4096)
            76         4   u32 next size slot (ring)
            80         8   f64 shape learned at (0 = never)
            88         2   u16 shape length (<= 62)
            90        62   the fronting site's handshake shape, opaque here (see
                           mtgworkers.protocol.serverhello)
           152     16384   f32 gaps (ms) ring
         16536     16384   u32 handshake sizes ring
         32920             (end)

    One process writes (the one that raids); readers take :meth:`snapshot`, which retries
    while the sequence is odd or changed during the read, so a reader never sees half an
    update. The sample rings let a new raider (after a reload or a restart) go on from
    what its predecessor learned.
    """

    MAGIC: Final = b"MTGWDOPL"
    VERSION: Final = 1
    SHAPE_MAX: Final = 62
    SIZE: Final = 152 + MAX_SAMPLES * 4 * 2
    _HEAD = struct.Struct("<8sII")
    _PARAMS = struct.Struct("<dddIIdd")  # k, lambda, fitted, mean, jitter, calibrated, raid
    _COUNTS = struct.Struct("<IIII")
    _SHAPE_AT = 80
    _GAPS_AT = 152
    _SIZES_AT = 152 + MAX_SAMPLES * 4

    def __init__(self, buf: Buffer) -> None:
        view = memoryview(buf)
        if len(view) < self.SIZE:
            raise ValueError(f"doppelganger state needs {self.SIZE} bytes, got {len(view)}")
        self._view = view
        magic, version, _ = self._HEAD.unpack_from(view, 0)
        if magic != self.MAGIC:
            if view.readonly:
                raise ValueError("not a doppelganger state (no magic)")
            self._HEAD.pack_into(view, 0, self.MAGIC, self.VERSION, 0)
            self._PARAMS.pack_into(view, 16, DEFAULT_K, DEFAULT_LAMBDA_MS, 0.0, 0, 0, 0.0, 0.0)
            self._COUNTS.pack_into(view, 64, 0, 0, 0, 0)
        elif version != self.VERSION:
            raise ValueError(f"doppelganger state of layout version {version}, not 1")
        self._gaps = view[self._GAPS_AT : self._SIZES_AT].cast("f")
        self._sizes = view[self._SIZES_AT : self.SIZE].cast("I")

    @classmethod
    def private(cls) -> SharedState:
        """A state in private memory (one process, tests)."""
        return cls(bytearray(cls.SIZE))

    # -- reading --------------------------------------------------------------------------

    def _sequence(self) -> int:
        return int(struct.unpack_from("<I", self._view, 12)[0])

    def snapshot(self) -> Learned:
        """A consistent copy of the learned values (never blocks the writer).

        A writer killed in the middle of an update leaves the sequence odd for good: after
        a bounded number of tries the values are taken as they are (each field is written
        whole, so they are still values the writer meant, only maybe not of one update).
        """
        for _ in range(1000):
            before = self._sequence()
            if before & 1:
                continue
            values = self._read()
            if self._sequence() == before:
                return values
        return self._read()

    def _read(self) -> Learned:
        k, lam, fitted, mean, jitter, calibrated, raid = self._PARAMS.unpack_from(self._view, 16)
        gaps, _, sizes, _ = self._COUNTS.unpack_from(self._view, 64)
        noise = NoiseParams(mean, jitter) if mean else None
        return Learned(WeibullParams(k, lam), noise, gaps, sizes, fitted, calibrated, raid)

    def shape(self) -> tuple[bytes, float]:
        """The stored handshake shape and when it was learned (``b""``, 0: never)."""
        for _ in range(1000):
            before = self._sequence()
            if before & 1:
                continue
            found = self._read_shape()
            if self._sequence() == before:
                return found
        return self._read_shape()

    def _read_shape(self) -> tuple[bytes, float]:
        at, length = struct.unpack_from("<dH", self._view, self._SHAPE_AT)
        length = min(length, self.SHAPE_MAX)
        return bytes(self._view[self._SHAPE_AT + 10 : self._SHAPE_AT + 10 + length]), at

    def set_shape(self, blob: bytes, now: float) -> None:
        """Store a handshake shape (at most :data:`SHAPE_MAX` bytes) learned at ``now``."""
        if len(blob) > self.SHAPE_MAX:
            raise ValueError(f"a shape has at most {self.SHAPE_MAX} bytes, not {len(blob)}")
        seq = self._begin()
        struct.pack_into("<dH", self._view, self._SHAPE_AT, now, len(blob))
        self._view[self._SHAPE_AT + 10 : self._SHAPE_AT + 10 + len(blob)] = blob
        self._end(seq)

    def gaps(self) -> list[float]:
        """The gap samples held, oldest first (writer side)."""
        count, nxt, _, _ = self._COUNTS.unpack_from(self._view, 64)
        return _ring(self._gaps, count, nxt)

    def sizes(self) -> list[int]:
        """The handshake size samples held, oldest first (writer side)."""
        _, _, count, nxt = self._COUNTS.unpack_from(self._view, 64)
        return [int(v) for v in _ring(self._sizes, count, nxt)]

    # -- writing (one process) ------------------------------------------------------------

    def _begin(self) -> int:
        seq = self._sequence() + 1
        struct.pack_into("<I", self._view, 12, seq & 0xFFFFFFFF)
        return seq

    def _end(self, seq: int) -> None:
        struct.pack_into("<I", self._view, 12, (seq + 1) & 0xFFFFFFFF)

    def raid_started(self, now: float) -> None:
        seq = self._begin()
        struct.pack_into("<d", self._view, 56, now)
        self._end(seq)

    def add(self, gaps_ms: Sequence[float], sizes: Sequence[int], now: float) -> Learned:
        """Keep the newest :data:`MAX_SAMPLES` gaps and sizes; refit k and lambda once there
        are :data:`MIN_GAPS_TO_FIT` gaps, recalibrate the noise once there are
        :data:`MIN_SIZES_TO_CALIBRATE` sizes. Returns the new snapshot."""
        view = self._view
        gap_count, gap_next, size_count, size_next = self._COUNTS.unpack_from(view, 64)
        seq = self._begin()
        for gap in gaps_ms:
            self._gaps[gap_next] = gap
            gap_next = (gap_next + 1) % MAX_SAMPLES
            gap_count = min(MAX_SAMPLES, gap_count + 1)
        for size in sizes:
            self._sizes[size_next] = max(0, min(int(size), 0xFFFFFFFF))
            size_next = (size_next + 1) % MAX_SAMPLES
            size_count = min(MAX_SAMPLES, size_count + 1)
        self._COUNTS.pack_into(view, 64, gap_count, gap_next, size_count, size_next)
        k, lam, fitted, mean, jitter, calibrated, raid = self._PARAMS.unpack_from(view, 16)
        if gaps_ms and gap_count >= MIN_GAPS_TO_FIT:
            try:
                fit = fit_weibull(_ring(self._gaps, gap_count, gap_next))
            except ValueError:
                pass
            else:
                k, lam, fitted = fit.k, fit.lambda_ms, now
        if sizes:
            calibration = noise_params([int(v) for v in _ring(self._sizes, size_count, size_next)])
            if calibration is not None:
                mean, jitter, calibrated = calibration.mean, calibration.jitter, now
        self._PARAMS.pack_into(view, 16, k, lam, fitted, mean, jitter, calibrated, raid)
        self._end(seq)
        return self.snapshot()


def _ring(values: memoryview[Any], count: int, nxt: int) -> list[float]:
    """The ``count`` newest entries of a ring whose next slot is ``nxt``, oldest first."""
    items = [float(v) for v in values.tolist()]
    if count < MAX_SAMPLES:
        return items[:count]
    return items[nxt:] + items[:nxt]
