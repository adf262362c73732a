"""`aem-dist demo`'s console, measured: short lines, a live table of changed rows (not a reprint per
state change), none of Ray's noise — which the run log keeps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

NOISE = ("You are trying to log an invalid value", "TBXLoggerCallback", "To visualize your results with TensorBoard", "PreemptionWatcher",
         "Token authentication is enabled", "Configuration for experiment", "View detailed results here")  # fmt: skip


def table_lines(console: str) -> list[str]:
    """The live table's lines: block headers '[aem] h:mm:ss  k of N grid points ...' and their rows."""
    out, inside = [], False
    for line in console.splitlines():
        if re.match(r"^\[aem\] \d+:\d\d:\d\d  \d+ of \d+ grid points", line):
            inside = True
        elif not (inside and line.startswith("  ")):
            inside = False
            continue
        out.append(line)
    return out


@pytest.mark.integration
def test_demo_console_is_short_and_quiet(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "aem_dist", "demo", "--out", str(tmp_path / "demo")], capture_output=True, text=True, timeout=900, env=env)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    lines = console.splitlines()
    assert max(len(line) for line in lines) <= 300, max(lines, key=len)
    table = table_lines(proc.stdout)
    assert 0 < len(table) < 60, "\n".join(table)
    assert "6 of 6 grid points finished" in table[-8] and all(" finished " in row for row in table[-6:]), "\n".join(table[-8:])
    for noise in NOISE:
        assert noise not in console, noise
    logs = list((tmp_path / "demo" / "sweep" / "logs").glob("demo-*.log"))
    assert len(logs) == 1 and f"log: {logs[0]}" in proc.stdout
    kept = logs[0].read_text()
    assert "PreemptionWatcher" in kept and "INFO aem_dist.engine.loop: epoch 9" in kept  # what the console left out
    assert "6 of 6 grid points finished" in kept  # the tables too
    assert (tmp_path / "demo" / "sweep" / "report.md").exists() and "# Sweep summary" in proc.stdout
