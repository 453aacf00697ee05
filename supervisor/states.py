"""The states of a worker process, as the supervisor, the scoreboard and the metrics see them.

One definition for all of them: the arbiter's view of its workers, the scoreboard record
in shared memory (which stores a state as a u32 code, see ``supervisor/shm.py``) and the
``workers{state}`` metric of the exporter.

A state *is* its name (``WorkerState.READY == "ready"``), so it goes into log lines, JSON
and metric labels as it is. :attr:`WorkerState.code` and :meth:`WorkerState.from_code`
translate to and from the integers in shared memory; those numbers are part of the
scoreboard layout and never change.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["WORKER_STATES", "WorkerState"]


class WorkerState(str, enum.Enum):
    """Where a worker process is in its life."""

    FREE = "free"  # scoreboard only: no worker owns the cell
    BOOTING = "booting"  # forked, not accepting yet
    READY = "ready"  # accepting and serving
    RETIRING = "retiring"  # stopped accepting, draining its sessions (reload, shutdown, ...)

    def __str__(self) -> str:
        return self.value

    @property
    def code(self) -> int:
        """The u32 the scoreboard stores for this state."""
        return _CODES[self]

    @classmethod
    def from_code(cls, code: int) -> WorkerState:
        """The state stored as ``code`` in the scoreboard. Raises ValueError."""
        try:
            return _BY_CODE[code]
        except KeyError:
            raise ValueError(f"unknown worker state code {code}") from None


# The scoreboard's byte layout: never renumber.
_CODES: Final = {
    WorkerState.FREE: 0,
    WorkerState.BOOTING: 1,
    WorkerState.READY: 2,
    WorkerState.RETIRING: 3,
}
_BY_CODE: Final = {code: state for state, code in _CODES.items()}

# The states of a live worker process (what the ``workers{state}`` metric counts).
WORKER_STATES: Final = (WorkerState.BOOTING, WorkerState.READY, WorkerState.RETIRING)
