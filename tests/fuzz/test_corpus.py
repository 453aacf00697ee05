"""Every corpus file of fuzz/corpus/ through its harness, in-process (no atheris needed)."""

from __future__ import annotations

import pytest

from fuzz import TARGETS
from fuzz.replay import replay_corpus


@pytest.mark.parametrize("target", list(TARGETS))
def test_corpus_replays_cleanly(target: str) -> None:
    count, errors = replay_corpus(target)
    assert count > 0
    assert errors == []
