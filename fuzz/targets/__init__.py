"""One harness per target: ``fuzz_one(data)`` plus what the campaign needs.

Every harness module defines ``fuzz_one(data: bytes) -> None``, which returns for every
input the product handles as it should and raises for a bug, and ``MAX_LEN`` (the
largest input tried).
Harnesses import nothing from atheris, so the corpus replays in the plain test suite.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Coroutine
from types import ModuleType
from typing import Any, TypeVar

_T = TypeVar("_T")

#: The secret of mtg's test vectors (tests/vectors/README.md); every seed is signed with it.
SECRET_HEX = "ee367a189aee18fa31c190054efd4a8e9573746f726167652e676f6f676c65617069732e636f6d"
#: The clock of the harnesses that verify hellos.
NOW = 1_700_000_000


def load(name: str) -> ModuleType:
    """The harness module of target ``name``."""
    return importlib.import_module(f"fuzz.targets.{name}")


def chunks(data: bytes, seed: int) -> list[bytes]:
    """``data`` cut into pieces chosen by ``seed`` (0: one piece), the same every time."""
    if not seed or not data:
        return [data]
    rng = random.Random(seed)
    limit = (1, 2, 5, 17, 64, 300, 1500, 20000)[seed & 7]
    out = []
    pos = 0
    while pos < len(data):
        size = rng.randint(1, limit)
        out.append(data[pos : pos + size])
        pos += size
    return out


def run_now(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine that must finish without waiting (all its input is there already)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        value: _T = stop.value
        return value
    coro.close()
    raise AssertionError("the coroutine waited although all its input had arrived")
