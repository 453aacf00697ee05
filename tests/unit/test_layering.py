"""The direction of dependencies, checked on the source (every import, lazy ones too).

- ``supervisor/`` uses ``mtgworkers/``; ``mtgworkers/`` never imports ``supervisor``,
  except the command line (``mtgworkers/cli.py``), which puts the program together.
- ``mtgworkers/protocol/`` is pure: wire formats over bytes, no I/O, no event loop, no
  logging, and nothing from the rest of the package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "mtgworkers"
COMPOSITION_ROOT = PACKAGE / "cli.py"
IO_MODULES = {"asyncio", "socket", "selectors", "ssl", "logging", "uvloop", "subprocess"}


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in ``path``, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def test_mtgworkers_never_imports_supervisor() -> None:
    found = [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != COMPOSITION_ROOT
        for line, module in imports(path)
        if _top(module) == "supervisor"
    ]
    assert found == []


def test_protocol_modules_are_pure() -> None:
    found = []
    for path in sorted((PACKAGE / "protocol").glob("*.py")):
        for line, module in imports(path):
            inside = module.startswith("mtgworkers.")
            if _top(module) in IO_MODULES or (
                inside and not module.startswith("mtgworkers.protocol")
            ):
                found.append(f"{path.relative_to(REPO)}:{line}: {module}")
    assert found == []


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from supervisor.exporter import X\n    import asyncio\n")
    assert list(imports(sample)) == [(2, "supervisor.exporter"), (3, "asyncio")]


def test_the_product_never_imports_the_fuzz_harnesses() -> None:
    """``fuzz/`` drives ``mtgworkers``; the proxy and the supervisor never import it."""
    found = [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for package in (PACKAGE, REPO / "supervisor")
        for path in sorted(package.rglob("*.py"))
        for line, module in imports(path)
        if _top(module) in ("fuzz", "tests")
    ]
    assert found == []
