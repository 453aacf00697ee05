"""What doctor found: sections of check lines, printed like ``mtg doctor`` or as JSON.

A :class:`Section` has a title (mtg's heading text) and :class:`Check` lines. Each check
has a :class:`Status`, a one-line message and ``figures`` (the numbers and names behind
the message, for ``--json``). The text form is mtg's: the heading on its own line, then
each check indented by two spaces and led by its emoji.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Check", "Report", "Section", "Status"]


class Status(enum.Enum):
    """How a check ended. Every status but OK and INFO makes doctor exit with 1 (as mtg)."""

    OK = "ok"
    WARNING = "warning"
    FAILURE = "failure"
    ERROR = "error"  # the check itself could not be done (mtg's ‼️)
    INFO = "info"  # context or a skipped check: never a failure

    @property
    def emoji(self) -> str:
        return _EMOJI[self]

    @property
    def passed(self) -> bool:
        return self in (Status.OK, Status.INFO)


_EMOJI = {
    Status.OK: "\u2705",
    Status.WARNING: "\u26a0\ufe0f",
    Status.FAILURE: "\u274c",
    Status.ERROR: "\u203c\ufe0f",
    Status.INFO: "\u2139\ufe0f",
}


@dataclass(frozen=True)
class Check:
    """One result line."""

    status: Status
    message: str
    figures: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status.value, "message": self.message, "figures": dict(self.figures)}


@dataclass
class Section:
    """One heading and its result lines. ``key`` is a stable identifier for ``--json``."""

    key: str
    title: str
    checks: list[Check] = field(default_factory=list)

    def add(self, status: Status, message: str, **figures: Any) -> Check:
        """Append a check line and return it."""
        check = Check(status, message, figures)
        self.checks.append(check)
        return check

    @property
    def passed(self) -> bool:
        return all(check.status.passed for check in self.checks)

    @property
    def status(self) -> Status:
        """The worst status of the section's lines (OK for a section without lines)."""
        order = (Status.ERROR, Status.FAILURE, Status.WARNING, Status.OK, Status.INFO)
        present = {check.status for check in self.checks}
        for status in order:
            if status in present:
                return status
        return Status.OK

    def render(self) -> str:
        lines = [self.title]
        lines += [f"  {check.status.emoji} {check.message}" for check in self.checks]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "status": self.status.value,
            "checks": [check.to_json() for check in self.checks],
        }


@dataclass
class Report:
    """All sections in mtg's order (plus ours).

    ``doppelganger``: what the doppelganger of each proxy running on this host learned
    (by supervisor pid: ``Learned.as_json``: k, lambda, mean gap, noise mean and jitter,
    samples, ages), or None when no proxy runs here; ``--json`` carries it as the
    top-level ``"doppelganger"`` key.
    """

    sections: list[Section] = field(default_factory=list)
    doppelganger: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return all(section.passed for section in self.sections)

    @property
    def exit_code(self) -> int:
        """0 when every check passed, else 1 (mtg's contract)."""
        return 0 if self.passed else 1

    def render(self) -> str:
        """The text report, mtg's layout."""
        return "".join(section.render() for section in self.sections)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.passed,
            "exit_code": self.exit_code,
            "sections": [section.to_json() for section in self.sections],
            "doppelganger": self.doppelganger,
        }

    def render_json(self) -> str:
        """One JSON object (2-space indent, UTF-8 text kept as is) and a newline."""
        return json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n"


def join_quoted(items: Iterable[str]) -> str:
    """``["a", "b"]`` -> ``"a", "b"`` (mtg's way to list addresses)."""
    return ", ".join(f'"{item}"' for item in items)
