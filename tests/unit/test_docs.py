"""Every reference to the design notes in docs/ names a section that exists there.

Comments and docstrings say ``docs/protocol.md §4.2`` or ``docs/mtg-compat.md c.3``; a
renumbered or deleted section would leave them pointing at nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"

# "§3", "§3.7"; an RFC's sections ("RFC 8484 §4.1") are someone else's.
_SECTION_REF = re.compile(r"§(\d+(?:\.\d+)?)")
_RFC_BEFORE = re.compile(r"RFC \d+ $")
# "mtg-compat.md (a)", "mtg-compat.md part (a)", "`docs/mtg-compat.md` a.3", "(d.4)".
_COMPAT_REF = re.compile(r"mtg-compat\.md`?,?\s+(?:part\s+)?\(?([a-e](?:\.\d+)?)\)?(?![\w.])")
_PROTOCOL_HEADING = re.compile(r"^##(?:#)? (\d+(?:\.\d+)?)\.? ", re.MULTILINE)
_COMPAT_HEADING = re.compile(r"^(?:## \(([a-e])\)|### ([a-e]\.\d+)) ", re.MULTILINE)
# Paths into a sibling checkout or a machine-specific directory.
_OUTSIDE = re.compile(r"\.\./shared|(?<![\w.])/(?:work|home|root)/")


def _scanned_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "config.example.toml", *DOCS.glob("*.md")]
    for folder in ("mtgworkers", "supervisor", "tests", "bench", "fuzz"):
        files += (REPO / folder).rglob("*.py")
        files += (REPO / folder).rglob("*.md")
    return sorted(set(files))


def _protocol_sections() -> set[str]:
    return set(_PROTOCOL_HEADING.findall((DOCS / "protocol.md").read_text()))


def _compat_sections() -> set[str]:
    text = (DOCS / "mtg-compat.md").read_text()
    return {part or sub for part, sub in _COMPAT_HEADING.findall(text)}


def test_the_notes_have_their_sections() -> None:
    assert {str(n) for n in range(18)} <= _protocol_sections()
    assert {"a", "b", "c", "d", "e", "a.3", "b.4", "c.1", "d.3", "e.1"} <= _compat_sections()


def test_every_section_reference_resolves() -> None:
    protocol, compat = _protocol_sections(), _compat_sections()
    missing = []
    for path in _scanned_files():
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(REPO)}:{number}"
            for match in _SECTION_REF.finditer(line):
                if match[1] not in protocol and not _RFC_BEFORE.search(line[: match.start()]):
                    missing.append(f"{where}: §{match[1]}")
            for match in _COMPAT_REF.finditer(line):
                if match[1] not in compat:
                    missing.append(f"{where}: mtg-compat.md {match[1]}")
    assert missing == []


def test_the_notes_stay_inside_the_repository() -> None:
    offenders = [
        f"{path.name}:{number}"
        for path in DOCS.glob("*.md")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _OUTSIDE.search(line)
    ]
    assert offenders == []


# "`tests/e2e/test_x.py::test_y`", and "`::test_z`" for another test of the same file.
_TEST_REF = re.compile(r"`(tests/[\w/]+\.py)?::(test_\w+)`")


def test_every_test_the_readme_names_exists() -> None:
    text = (REPO / "README.md").read_text()
    named, missing = 0, []
    for line in text.splitlines():
        current: str | None = None
        for match in _TEST_REF.finditer(line):
            current = match[1] or current
            assert current is not None, f"README names ::{match[2]} without its file: {line}"
            source = REPO / current
            defined = source.exists() and re.search(
                rf"^(?:async )?def {match[2]}\(", source.read_text(), re.MULTILINE
            )
            named += 1
            if not defined:
                missing.append(f"{current}::{match[2]}")
    assert named >= 20  # the "what a censor sees" table at least
    assert missing == []
