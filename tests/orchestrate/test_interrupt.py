"""Ctrl-C in a sweep: the grid points that were training show as interrupted, no report is written, the
console says what --resume will do (and nothing of Tune's restore advice or workers' exit tracebacks),
and --resume keeps the finished trials' numbers and wall time."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

GRID = "sweep.grid={loss.lam: [0.0, 0.1, 0.5]}"


def _sweep(demo_data: str, out: Path, *extra: str) -> list[str]:
    sets = [f"data.root={demo_data}", GRID, "train.epochs=3", "scaling.num_workers=0", "sweep.population=off", "sweep.max_concurrent_trials=1",
            "metrics.enabled=false", "sweep.report=true", "run.name=ctrlc"]  # fmt: skip
    return [sys.executable, "-m", "aem_dist", "sweep", "--config", "demo", "--out", str(out), *[a for s in sets for a in ("--set", s)], *extra]


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "trials.csv") as f:
        return {r["trial"]: r for r in csv.DictReader(f)}


@pytest.mark.integration
def test_ctrl_c_marks_interrupted_skips_the_report_and_resume_keeps_finished(demo_data, tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(_sweep(demo_data, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not list((out / "trials").glob("*/results.json")):  # the first grid point finished ...
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no trial finished"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # ... Ctrl-C, as a terminal sends it: to the whole process group
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    console = stdout + stderr
    assert proc.returncode == 130, console[-3000:]
    assert "interrupted (Ctrl-C) after" in stderr and "--resume keeps the" in stderr and "from the start" in stderr
    for wrong in ("Tuner.restore", "their errors are above", "WeakSet", "SystemExit"):
        assert wrong not in console, wrong
    assert not (out / "report.md").exists() and not (out / "summary.csv").exists()
    rows = _rows(out)
    finished = {n: r for n, r in rows.items() if r["status"] == "TERMINATED"}
    assert finished and all(r["status"] in ("TERMINATED", "INTERRUPTED", "PENDING") for r in rows.values())
    if any(r["status"] == "INTERRUPTED" for r in rows.values()):
        assert "interrupted" in stdout.split("[ctrlc]")[-1]  # the last table shows it
    before = {n: (json.loads((out / "trials" / n / "results.json").read_text()), float(r["wall_s"])) for n, r in finished.items()}

    proc = subprocess.run(_sweep(demo_data, out, "--resume"), capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = _rows(out)
    assert all(r["status"] == "TERMINATED" for r in rows.values())
    for name, (results, wall) in before.items():
        again = json.loads((out / "trials" / name / "results.json").read_text())
        assert again == results  # kept as it was, not retrained
        assert float(rows[name]["wall_s"]) == pytest.approx(wall) and wall > 1.0  # its own training time, not the instant resume
        assert rows[name]["test_auc"] not in ("", None)
    assert (out / "report.md").exists()
