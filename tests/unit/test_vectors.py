"""The vendored vectors are complete and unchanged, and nothing reads files outside the repo.

A missing vector file must fail the suite: tests that glob the folder would otherwise
collect zero cases and pass without checking anything.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from tests.support.vectors import MTG_VECTORS

REPO = Path(__file__).resolve().parents[2]

MTG_FILES = {
    "client-handshake-snapshot-4529d55776e2d427.json": (
        "242faeff2422eb87c71afd5d549622e7762e7eb6d7ed7fd0dfc6bc38c14b0cae"
    ),
    "client-hello-bad-fa2e46cdb33e2a1b.json": (
        "39cb34c2ee68f54578642f4df6a47d4c5b119af5b883aaa0e3bcb63876fe5a41"
    ),
    "client-hello-ok-19dfe38384b9884b.json": (
        "f452a3a9b2f66f94803d2fcf701fe064344f9e808270dc62ca642abe4c265e9e"
    ),
    "client-hello-ok-48f8a72a56f3174a.json": (
        "53fb4893cf40d59b621fadd6611e994ed1356007e531f99a6ac9fb9f2d1a2011"
    ),
    "client-hello-ok-651054256093c6cd.json": (
        "af05e044a96688372050cf599f1cd60397549f656a89908e060f6cc078bfdcd3"
    ),
    "client-hello-ok-grease-first.json": (
        "7d3844bd3b6bed91e3bf6dfe64a83dd9c0a5454060f1d264941a7e031b77bfa0"
    ),
}


def test_mtg_vectors_are_vendored_unchanged() -> None:
    present = {p.name for p in MTG_VECTORS.glob("*.json")}
    assert present == set(MTG_FILES)
    for name, digest in MTG_FILES.items():
        assert hashlib.sha256((MTG_VECTORS / name).read_bytes()).hexdigest() == digest, name


def test_mtg_licence_travels_with_the_vectors() -> None:
    text = (MTG_VECTORS / "LICENSE.mtg").read_text()
    assert "MIT License" in text
    assert "Sergey Arkhipov" in text


# A path into a sibling checkout or a machine-specific absolute directory; system paths
# such as /proc or /etc are fine.
_OUTSIDE = re.compile(r"""\.\./shared|["'](/work|/home|/root)/""")


def test_no_project_file_reads_outside_the_repository() -> None:
    offenders = []
    for folder in ("mtgworkers", "supervisor", "tests", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            if path == Path(__file__).resolve():
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if _OUTSIDE.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []
