"""The doppelganger's statistics (mtgworkers.defense.doppel): pure functions and the state."""

from __future__ import annotations

import math
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtgworkers.defense import doppel
from mtgworkers.defense.doppel import (
    DEFAULT_K,
    DEFAULT_LAMBDA_MS,
    MAX_SAMPLES,
    NoiseParams,
    Record,
    SharedState,
    WeibullParams,
    fit_weibull,
    handshake_size,
    noise_length,
    noise_params,
    record_gaps,
    weibull_delay,
)

MTG = WeibullParams()


def test_defaults_are_mtgs_and_cap_a_connection_near_2_4_mb_s() -> None:
    assert (MTG.k, MTG.lambda_ms) == (DEFAULT_K, DEFAULT_LAMBDA_MS)
    assert 6.0 < MTG.mean_ms < 7.5
    # one 16 KiB record per mean gap
    assert 2.2e6 < 16379 / (MTG.mean_ms / 1000) < 2.7e6


def test_delay_is_the_inverse_cdf() -> None:
    # X = lambda (-ln(1-u))^(1/k), in seconds
    assert weibull_delay(MTG, 0.0) == 0.0
    u = 0.5
    expected = DEFAULT_LAMBDA_MS * (-math.log(0.5)) ** (1 / DEFAULT_K) / 1000
    assert weibull_delay(MTG, u) == pytest.approx(expected)
    assert weibull_delay(MTG, 0.999999) > weibull_delay(MTG, 0.9) > weibull_delay(MTG, 0.1)


def test_sampled_delays_have_the_weibull_mean() -> None:
    rng = random.Random(7)
    n = 200_000
    mean = sum(weibull_delay(MTG, rng.random()) for _ in range(n)) / n * 1000
    assert mean == pytest.approx(MTG.mean_ms, rel=0.05)


@pytest.mark.parametrize(("k", "lam"), [(DEFAULT_K, DEFAULT_LAMBDA_MS), (1.5, 10.0), (0.8, 3.0)])
def test_fit_recovers_the_parameters(k: float, lam: float) -> None:
    rng = random.Random(11)
    truth = WeibullParams(k, lam)
    gaps = [weibull_delay(truth, rng.random()) * 1000 for _ in range(4096)]
    fit = fit_weibull(gaps)
    assert fit.k == pytest.approx(k, rel=0.08)
    assert fit.lambda_ms == pytest.approx(lam, rel=0.12)


def test_fit_ignores_zero_gaps_and_refuses_none() -> None:
    assert fit_weibull([0.0, 1.0, 2.0, 3.0]) == fit_weibull([1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        fit_weibull([0.0, -1.0])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=1e-3, max_value=1e4), min_size=2, max_size=200))
def test_fit_gives_finite_positive_parameters(gaps: list[float]) -> None:
    fit = fit_weibull(gaps)
    assert doppel.FIT_LOW_K <= fit.k <= doppel.FIT_HIGH_K
    assert math.isfinite(fit.lambda_ms) and fit.lambda_ms > 0


def _fetch() -> list[Record]:
    # ServerHello, CCS, 3 encrypted handshake records, then (after our request) the answer
    return [
        Record(0x16, 122, 0.000),
        Record(0x14, 1, 0.001),
        Record(0x17, 2000, 0.002),
        Record(0x17, 1500, 0.004),
        Record(0x17, 300, 0.005),
        Record(0x17, 16000, 0.050),
        Record(0x17, 16000, 0.053),
    ]


def test_gaps_start_at_the_record_before_the_first_application_data() -> None:
    gaps = record_gaps(_fetch())
    assert gaps == pytest.approx([1.0, 2.0, 1.0, 45.0, 3.0])
    assert record_gaps([Record(0x17, 1, 5.0), Record(0x17, 1, 5.5)]) == [0.0, 500.0]
    assert record_gaps([Record(0x16, 1, 0.0)]) == []


def test_handshake_size_counts_until_our_first_write() -> None:
    assert handshake_size(_fetch(), 5) == 3800
    assert handshake_size(_fetch(), None) == 3800 + 32000
    assert handshake_size(_fetch()[:2], None) == 0  # no CCS seen: nothing
    assert handshake_size([Record(0x17, 10, 0.0)], None) == 0


def test_noise_params_are_mtgs() -> None:
    assert noise_params([4000, 4100]) is None  # fewer than three
    assert noise_params([4000, 4050, 4100]) == NoiseParams(4050, 100)  # jitter at least 100
    assert noise_params([3000, 4000, 6500]) == NoiseParams(4500, 2000)


def test_noise_length_bounds() -> None:
    params = NoiseParams(4500, 200)
    lengths = {noise_length(params, random.Random(s).randrange) for s in range(300)}
    assert min(lengths) >= 4300 and max(lengths) < 4700  # type: ignore[type-var]
    assert noise_length(NoiseParams(900, 100), lambda n: 0) == doppel.MIN_NOISE
    assert noise_length(None, random.randrange) is None


def test_shared_state_starts_with_mtgs_defaults() -> None:
    state = SharedState.private()
    snap = state.snapshot()
    assert snap.weibull == MTG and snap.noise is None
    assert (snap.gaps, snap.sizes, snap.fitted_at, snap.raid_at) == (0, 0, 0.0, 0.0)


def test_shared_state_refits_at_a_hundred_gaps_and_calibrates_at_three_sizes() -> None:
    state = SharedState.private()
    rng = random.Random(3)
    truth = WeibullParams(0.9, 4.0)
    gaps = [weibull_delay(truth, rng.random()) * 1000 for _ in range(150)]
    snap = state.add(gaps[:99], [5000, 5200], now=100.0)
    assert snap.weibull == MTG and snap.noise is None  # not enough of either yet
    snap = state.add(gaps[99:], [5100], now=200.0)
    assert snap.fitted_at == 200.0 and snap.weibull != MTG
    assert snap.noise == NoiseParams(5100, 100) and snap.calibrated_at == 200.0
    assert snap.gaps == 150 and snap.sizes == 3
    assert state.gaps() == pytest.approx(gaps, rel=1e-6)  # stored as f32


def test_rings_keep_the_newest_samples() -> None:
    state = SharedState.private()
    state.add([float(i + 1) for i in range(MAX_SAMPLES + 10)], list(range(MAX_SAMPLES + 5)), 1.0)
    assert state.gaps()[0] == 11.0 and state.gaps()[-1] == MAX_SAMPLES + 10.0
    assert len(state.gaps()) == MAX_SAMPLES
    assert state.sizes()[0] == 5 and state.sizes()[-1] == MAX_SAMPLES + 4


def test_a_second_view_of_the_buffer_sees_the_same_state() -> None:
    buf = bytearray(SharedState.SIZE)
    writer = SharedState(buf)
    writer.raid_started(42.0)
    writer.add([1.0] * 100, [3000, 3000, 3000], now=43.0)
    reader = SharedState(buf)  # does not reinitialise a buffer that has the magic
    assert reader.snapshot() == writer.snapshot()
    assert reader.snapshot().raid_at == 42.0


def test_a_writer_killed_mid_update_does_not_hang_readers() -> None:
    buf = bytearray(SharedState.SIZE)
    state = SharedState(buf)
    struct.pack_into("<I", buf, 12, 7)  # odd: an update that never finished
    assert state.snapshot().weibull == MTG


def test_bad_buffers_are_refused() -> None:
    with pytest.raises(ValueError, match="needs"):
        SharedState(bytearray(100))
    buf = bytearray(SharedState.SIZE)
    SharedState(buf)
    struct.pack_into("<I", buf, 8, 9)
    with pytest.raises(ValueError, match="version 9"):
        SharedState(buf)


def test_json_form_for_doctor() -> None:
    state = SharedState.private()
    state.add([2.0] * 120, [4000, 4000, 4400], now=1000.0)
    data = state.snapshot().as_json(now=1060.0)
    assert data["learned"] is True and data["gap_samples"] == 120
    assert data["noise_mean"] == 4133 and data["noise_jitter"] == 267
    assert data["fitted_age_seconds"] == 60.0 and data["raid_age_seconds"] is None


def test_the_shape_slot_stores_an_opaque_blob() -> None:
    state = SharedState.private()
    assert state.shape() == (b"", 0.0)
    state.set_shape(b"\x13\x02\x00\x2b\x00\x33", 77.0)
    assert state.shape() == (b"\x13\x02\x00\x2b\x00\x33", 77.0)
    state.set_shape(b"", 78.0)
    assert state.shape() == (b"", 78.0)
    with pytest.raises(ValueError):
        state.set_shape(bytes(63), 79.0)
    state.add([1.0] * 10, [], now=80.0)  # the samples do not overwrite the shape
    assert state.shape() == (b"", 78.0)


def test_doctor_reads_the_state_of_running_proxies(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    from mtgworkers.doctor import running_doppelganger

    assert running_doppelganger(str(tmp_path)) is None
    live = tmp_path / f"mtgworkers-{os.getpid()}-0123456789abcdef-doppel"
    state_buf = bytearray(SharedState.SIZE)
    SharedState(state_buf).add([2.0] * 120, [4000, 4000, 4000], now=1.0)
    live.write_bytes(bytes(state_buf))
    gone = tmp_path / "mtgworkers-999999999-0123456789abcdef-doppel"  # no such process
    gone.write_bytes(bytes(state_buf))
    found = running_doppelganger(str(tmp_path))
    assert found is not None and list(found) == [str(os.getpid())]
    assert found[str(os.getpid())]["gap_samples"] == 120
    assert found[str(os.getpid())]["noise_mean"] == 4000
