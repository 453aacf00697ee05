"""``python -m supervisor.exporter``: the exporter process, as :class:`Exporter` starts it
(see :func:`supervisor.exporter.process.main` for its arguments)."""

import sys

from supervisor.exporter.process import main

sys.exit(main())
