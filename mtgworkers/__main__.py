"""``python -m mtgworkers``: the same command line as the ``mtgworkers`` script."""

from __future__ import annotations

import sys

from mtgworkers.cli import main

if __name__ == "__main__":
    sys.exit(main())
