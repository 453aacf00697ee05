"""The scout's record framer and raid claims (mtgworkers.defense.scout), without network."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from mtgworkers.config.model import Doppelganger
from mtgworkers.defense.doppel import Record, SharedState
from mtgworkers.defense.scout import Fetch, Raider, ScoutError, _RecordFramer


def test_the_framer_cuts_records_across_chunks() -> None:
    records: list[Record] = []
    times = iter([1.0, 2.0, 3.0])
    framer = _RecordFramer(records, lambda: next(times))
    stream = b"\x16\x03\x03\x00\x02ab" + b"\x17\x03\x03\x00\x03xyz"
    framer.feed(stream[:4])
    framer.feed(stream[4:9])
    framer.feed(stream[9:])
    assert records == [Record(0x16, 2, 2.0), Record(0x17, 3, 3.0)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_the_framer_takes_any_bytes(chunks: list[bytes]) -> None:
    records: list[Record] = []
    framer = _RecordFramer(records, lambda: 0.0)
    for chunk in chunks:
        framer.feed(chunk)
    assert sum(5 + r.length for r in records) <= sum(map(len, chunks))


def test_raids_are_claimed_once_per_raid_each() -> None:
    state = SharedState.private()
    now = [1000.0]
    settings_ = Doppelganger(urls=("https://a.test/",), repeats_per_raid=2, raid_each=60.0)

    async def fetch(url: str) -> Fetch:
        return Fetch([Record(0x14, 1, 0.0), Record(0x17, 4000, 0.001)], 2)

    first = Raider(settings_, state, fetch, clock=lambda: now[0])
    second = Raider(settings_, state, fetch, clock=lambda: now[0])
    assert first.claim() == 0.0
    assert second.claim() == 60.0  # a second raider (a reload's) waits
    now[0] += 59.5
    assert second.claim() == 0.5
    now[0] += 0.5
    assert second.claim() == 0.0


def test_a_failed_fetch_is_logged_and_skips_the_repeat(caplog) -> None:  # type: ignore[no-untyped-def]
    state = SharedState.private()
    calls = []

    async def fetch(url: str) -> Fetch:
        calls.append(url)
        raise ScoutError(f"{url}: connection refused")

    settings_ = Doppelganger(urls=("https://a.test/", "https://b.test/"), repeats_per_raid=3)
    with caplog.at_level("WARNING", logger="mtgworkers.doppelganger"):
        asyncio.run(Raider(settings_, state, fetch).raid())
    assert calls == ["https://a.test/"] * 3  # mtg: a failed URL ends that repeat
    assert [r.getMessage() for r in caplog.records] == ["cannot learn"] * 3
    assert state.snapshot().gaps == 0
