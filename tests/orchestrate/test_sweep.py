"""Ray Tune sweeps through the CLI: result tables, and resuming after the driver is killed."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from aem_dist.observe.tables import read_csv
from tests.fixtures.ray_cluster import _kill_leftovers

pytestmark = pytest.mark.integration

GRID = "sweep.grid={train.seed: [0, 1], loss.lam: [0.0, 0.1]}"


def _sweep_cmd(demo_data, out, *extra):
    # Relative paths on purpose: Ray runs trials in other working directories.
    return [
        sys.executable, "-m", "aem_dist", "sweep", "--config", "demo", "--out", os.path.relpath(out, out.parent),
        "--set", f"data.root={os.path.relpath(demo_data, out.parent)}", "--set", "train.epochs=2", "--set", "scaling.num_workers=0",
        "--set", "train.progress=false", "--set", "sweep.max_concurrent_trials=1",
        "--set", "metrics.port=0", "--set", "metrics.grace_s=0", "--set", GRID, *extra,
    ]  # fmt: skip


def test_sweep_tables_and_resume_after_driver_kill(demo_data, tmp_path):
    out = tmp_path / "sweep"
    # The driver's private Ray lives under this (short: socket paths) dir; we clean up by this marker.
    private_tmp = Path(tempfile.mkdtemp(prefix="aems-", dir="/tmp"))
    env = {**os.environ, "TMPDIR": str(private_tmp)}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_sweep_cmd(demo_data, out), env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while len(list(out.glob("trials/*/results.json"))) < 2:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "the first two trials did not finish in time"
            time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-sweep, with no chance to clean up
        proc.wait()
        _kill_leftovers(str(private_tmp))
        log.close()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trials/*/results.json")}
    assert 2 <= len(finished) < 4
    assert not (out / "summary.md").exists()

    refused = subprocess.run(_sweep_cmd(demo_data, out), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--resume" in refused.stderr  # never silently restart over a sweep

    resumed = subprocess.run(_sweep_cmd(demo_data, out, "--resume"), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    _kill_leftovers(str(private_tmp))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name, mtime in finished.items():  # finished trials were not run again
        assert (out / "trials" / name / "results.json").stat().st_mtime_ns == mtime, name

    rows = read_csv(str(out / "trials.csv"))
    assert sorted((r["train.seed"], r["loss.lam"]) for r in rows) == [(0, 0.0), (0, 0.1), (1, 0.0), (1, 0.1)]
    assert all(r["status"] == "TERMINATED" and 0 <= r["test_auc"] <= 1 and r["best_epoch"] in (0, 1) for r in rows)
    summary = read_csv(str(out / "summary.csv"))
    assert [(s["loss.lam"], s["n"]) for s in summary] == [(0.0, 2), (0.1, 2)]
    assert sum(bool(s["chosen"]) for s in summary) == 1
    assert summary[1]["p_test_auc_vs_lam0"] is None and summary[1]["p_test_auc_note"] == "2 pairs (fewer than 3)"  # 2 seeds: no p-value
    text = (out / "summary.md").read_text()
    assert "| 0.1 | 2 |" in text and "chosen by val" in text
    assert "summary" in resumed.stdout.lower() and "metrics: http://127.0.0.1:" in resumed.stdout
    assert (out / "report.md").exists() and len(list((out / "plots").glob("*.png"))) == 5  # Figs. 3, 5, 8, 9, 11
    run = __import__("json").loads((out / "run.json").read_text())
    assert run["grid"] == {"train.seed": [0, 1], "loss.lam": [0.0, 0.1]} and run["dataset"]["manifest_sha256"]
    assert run["datasets"] == {demo_data: run["dataset"]["manifest_sha256"]}  # every dataset the sweep read
    # Only the killed driver's Ray temp dir is left; the resumed run removed its own on exit.
    assert len(list(private_tmp.glob("aem-ray-*"))) == 1
    shutil.rmtree(private_tmp, ignore_errors=True)
