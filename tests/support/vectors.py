"""Where the vendored test vectors live (inside the repository, see tests/vectors/README.md)."""

from __future__ import annotations

from pathlib import Path

VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"
MTG_VECTORS = VECTORS_DIR / "mtg"
