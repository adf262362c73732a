"""Progress bars with rates for long operations (tqdm), quiet when output is not a terminal."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def progress(total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False, **kw: Any) -> tqdm:
    """A tqdm bar on stderr; refreshes twice a second on a terminal, every 10 s in logs."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, mininterval=0.5 if tty else 10.0, file=sys.stderr, **kw)
