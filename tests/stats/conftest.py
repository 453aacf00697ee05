"""Fixtures of the metrics tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtgworkers.stats.prometheus import MULTIPROC_ENV, create_multiproc_dir


@pytest.fixture
def metrics_dir(tmp_path: Path) -> Iterator[str]:
    saved = os.environ.get(MULTIPROC_ENV)
    yield create_multiproc_dir(str(tmp_path))
    if saved is None:
        os.environ.pop(MULTIPROC_ENV, None)
    else:
        os.environ[MULTIPROC_ENV] = saved
