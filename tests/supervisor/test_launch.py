"""The launch spec a worker gets across exec, and the worker's memory-trim decisions."""

from __future__ import annotations

import asyncio
import json

import pytest

from supervisor.launch import SPEC_VERSION, LaunchSpec, SpecError
from supervisor.worker import MemoryTrimmer, glibc_malloc_trim


def _spec() -> LaunchSpec:
    return LaunchSpec(
        slot=1,
        generation=2,
        cell=3,
        supervisor_pid=4,
        config_data={"secret": "ee00", "network": {"proxies": []}},
        config_base_dir="/etc/x",
        listen_fd=5,
        report_fd=6,
        life_fd=7,
        scoreboard_fd=8,
        scoreboard_path="/dev/shm/s",
        replay_fd=9,
        replay_path="/dev/shm/r",
    )


def test_spec_round_trip_and_inherited_descriptors() -> None:
    spec = _spec()
    assert LaunchSpec.decode(spec.encode()) == spec
    assert spec.fds == (5, 6, 7, 8, 9)


def test_a_spec_of_another_version_is_refused_with_the_reason() -> None:
    document = json.loads(_spec().encode())
    document["version"] = SPEC_VERSION + 1
    with pytest.raises(SpecError, match="restart the proxy"):
        LaunchSpec.decode(json.dumps(document).encode())
    document["version"] = SPEC_VERSION
    document["unknown"] = 1
    with pytest.raises(SpecError, match="does not fit"):
        LaunchSpec.decode(json.dumps(document).encode())


def test_trims_only_after_a_large_drop_below_the_peak() -> None:
    loop = asyncio.new_event_loop()
    try:
        calls: list[int] = []
        counts = iter([100, 2000, 1500, 900, 900, 600, 5000, 100])
        trimmer = MemoryTrimmer(lambda: calls.append(1) or 0, lambda: next(counts), loop)
        decisions = [trimmer.check() for _ in range(8)]
        trimmer.stop()
    finally:
        loop.close()
    # peak 2000; 1500 is not half; 900 is; then the peak is 900: 600 is not 256 below;
    # 5000 is the new peak, 100 is far below it
    assert decisions == [False, False, False, True, False, False, False, True]
    assert len(calls) == 2


def test_glibc_malloc_trim_is_callable_here() -> None:
    trim = glibc_malloc_trim()
    if trim is None:
        pytest.skip("not glibc")
    assert trim() in (0, 1)
