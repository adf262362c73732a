"""Sweeps and runs on a real multi-node Ray cluster (head with no CPUs + two worker nodes), state on S3;
and a resource request no node holds, on a CPU-only local Ray, through the CLI."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.fixtures.ray_cluster import _kill_leftovers

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
STARTING_ENV = dict(os.environ)  # at collection, before any test ran


def test_multinode_cluster_cases(tmp_path):
    """multinode_cases.py, on one head + 2 worker nodes with all state on S3, in its own process (see that
    file's docstring): a 2-point sweep runs one trial per worker node and fills only that node's shard
    cache; local paths, a GPU per trial and a node that cannot reach S3 are refused before any trial;
    DDP with one worker per node equals a 1-node run; a node lost mid-sweep costs no result."""
    cases = Path(__file__).with_name("multinode_cases.py")
    # ... and with the environment this pytest process started with: earlier tests' Ray sessions and S3
    # fixtures leave RAY_*/AWS_* variables behind in os.environ, which the nodes would inherit.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))} | {k: v for k, v in STARTING_ENV.items() if k.startswith(("RAY_", "AWS_"))}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "4 passed" in proc.stdout, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_gpu_trials_on_cpu_only_local_ray_fail_clearly(demo_data, tmp_path):
    private_tmp = Path(tempfile.mkdtemp(prefix="aemg-", dir="/tmp"))
    cmd = [
        sys.executable, "-m", "aem_dist", "sweep", "--config", "demo", "--out", str(tmp_path / "sweep"),
        "--set", f"data.root={demo_data}", "--set", "scaling.num_workers=0", "--set", "sweep.trial_gpus=1",
        "--set", "metrics.enabled=false", "--set", "train.progress=false",
    ]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(private_tmp), "CUDA_VISIBLE_DEVICES": ""}  # CPU-only, even on a GPU machine
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # a hang guard
    finally:
        _kill_leftovers(str(private_tmp))
        leftover = list(private_tmp.glob("aem-ray-*"))
        shutil.rmtree(private_tmp, ignore_errors=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: one trial needs CPU 1, GPU 1 (sweep.trial_cpus, sweep.trial_gpus) but no node of this Ray cluster has that much" in proc.stderr
    assert not (tmp_path / "sweep" / "trials").exists()
    assert not leftover  # the private Ray was shut down and its temp dir removed
