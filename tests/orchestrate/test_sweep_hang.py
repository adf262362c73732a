"""A sweep never hangs silently: one reporting path per trial (the late-relay race), and the stall watchdog."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from aem_dist.config import load_config
from aem_dist.observe.tables import read_csv
from aem_dist.orchestrate.errors import SweepError
from tests.fixtures.ray_cluster import _kill_leftovers

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LATE_RELAY_TIMEOUT_S = 420  # the sweep takes ~1-2 min on a busy 2-core machine; the race makes it wait forever


def test_late_relay_of_the_last_epoch_cannot_hang_a_sweep(demo_data, tmp_path):
    """The interleaving that hung sweeps, forced: Tune's relay of the last epoch report (the trial actor's main
    thread) is held until the trial function has returned from fit() and reported again (tests/orchestrate/late_relay.py).
    With TuneReportCallback relaying through that thread both puts block on Tune's one-slot queue for good."""
    out = tmp_path / "sweep"
    private_tmp = Path(tempfile.mkdtemp(prefix="aemh-", dir="/tmp"))
    env = {**os.environ, "TMPDIR": str(private_tmp), "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "tests.orchestrate.late_relay", "sweep", "--config", "demo", "--out", str(out), "--set", f"data.root={demo_data}",
           "--set", "scaling.num_workers=1", "--set", "train.epochs=2", "--set", "train.progress=false", "--set", "metrics.port=0",
           "--set", "metrics.grace_s=0", "--set", "sweep.report=false", "--set", "sweep.grid={loss.lam: [0.0, 0.1]}"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LATE_RELAY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the sweep hung after the late relay (no end within {LATE_RELAY_TIMEOUT_S} s):\n{output[-3000:]}")
    finally:
        _kill_leftovers(str(private_tmp))
        shutil.rmtree(private_tmp, ignore_errors=True)
    assert proc.returncode == 0, output[-3000:]
    assert "late relay held" in output  # the interleaving was forced, not hoped for
    rows = read_csv(str(out / "trials.csv"))
    assert sorted(r["loss.lam"] for r in rows) == [0.0, 0.1] and all(r["status"] == "TERMINATED" for r in rows)


def _sweep(demo_data, out, *overrides, resume=False):
    from aem_dist.orchestrate.sweep import run_sweep

    cfg = load_config("demo", [f"data.root={demo_data}", "train.progress=false", "metrics.port=0", "metrics.grace_s=0", "train.epochs=2",
                               "scaling.num_workers=0", "sweep.population=off", "sweep.report=false", "sweep.grid={loss.lam: [0.0, 0.1]}", *overrides])
    return run_sweep(cfg, str(out), resume=resume)


def test_watchdog_fails_stalled_trials_and_resume_finishes_them(local_ray, demo_data, tmp_path, caplog):
    out = tmp_path / "stalled"
    with pytest.raises(SweepError) as failed:  # both trials stop reporting after epoch 0 and sit idle
        _sweep(demo_data, out, "debug.stall_at_epoch=0", "run.stall_timeout_s=15")  # start-up (no report yet) may take 2 x 15 s
    text = str(failed.value)
    assert "2 of 2 grid point(s) did not finish" in text
    stalls = [line for line in text.splitlines() if "stalled trial" in line]
    assert sorted(line.split()[2].rstrip(":") for line in stalls) == ["lam=0.0", "lam=0.1"], text
    assert all("(last epoch: 0)" in line and "idle (pid" in line and "logs: " in line and "--resume" in line for line in stalls), text
    assert sum("stalled trial" in r.getMessage() for r in caplog.records) == 2  # printed as it happened, once per trial

    _sweep(demo_data, out, "debug.stall_at_epoch=0", "run.stall_timeout_s=600", resume=True)  # from the checkpoint of epoch 0
    for lam in ("0.0", "0.1"):
        result = json.loads((out / "trials" / f"lam={lam}" / "results.json").read_text())
        assert result["resumed_after_epoch"] == 0 and len(result["history"]) == 2, lam
    assert all(r["status"] == "TERMINATED" for r in read_csv(str(out / "trials.csv")))


def test_watchdog_ends_a_sweep_that_cannot_place_its_trials(local_ray, demo_data, tmp_path):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    hog = placement_group([{"CPU": 2.0}])  # every CPU of the session, so no trial can start
    ray.get(hog.ready(), timeout=60)
    try:
        with pytest.raises(SweepError) as failed:
            _sweep(demo_data, tmp_path / "waiting", "run.wait_timeout_s=3")
    finally:
        remove_placement_group(hog)
    text = str(failed.value)
    assert "none of them raised an error" in text and "stalled sweep: 2 trial(s) waiting and none running" in text, text
    assert "CPU=0" in text  # what is free, so the user sees why
