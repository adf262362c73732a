"""``aem-dist`` command line. One module per command group registers its commands on :data:`app`.

Commands: synth, train, demo, config (core); sweep (Ray); verify, ingest, splits (data); report, predict, export,
heatmap (observe). ``aem-dist COMMAND --help`` explains each.
"""

from __future__ import annotations

from .app import app, main

from . import core, data, observe, sweep  # noqa: E402,F401  (registers commands)

__all__ = ["app", "main"]
