"""Matplotlib plumbing shared by reports and heatmaps: Agg-only figures, PNG bytes to any URL.

Figures are built with ``matplotlib.figure.Figure`` and an Agg canvas, never through ``pyplot``, so
no GUI backend is touched and nothing global (current figure, backend) is shared between callers.
"""

from __future__ import annotations

import io
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .. import storage
from ..storage import StorageOptions

DPI = 120


def new_figure(width: float, height: float, **kw: Any) -> Figure:
    """A figure of ``width`` × ``height`` inches on an Agg canvas (constrained layout)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def save_png(fig: Figure, url: str, options: StorageOptions | None = None) -> str:
    """Write ``fig`` as PNG to a path or URL (atomically); returns ``url``."""
    storage.atomic_write_bytes(url, png_bytes(fig), options)
    return url
