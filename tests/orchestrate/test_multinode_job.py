"""A Ray job on a real multi-node cluster (head with no CPUs + two worker nodes, state on S3): the
documented sweep command submitted, its driver killed, the same command submitted again."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
STARTING_ENV = dict(os.environ)  # at collection, before any test ran


def test_resubmitted_job_completes_only_unfinished_trials():
    """multinode_job_cases.py: `ray job submit` of the README/RayJob command (data and results on S3),
    the driver SIGKILLed once some trials finished; resubmitting the same command trains only the rest,
    and trials.csv / summary equal an uninterrupted sweep's. In its own process (see that file)."""
    cases = Path(__file__).with_name("multinode_job_cases.py")
    # ... and with the environment this pytest process started with: earlier tests' Ray sessions and S3
    # fixtures leave RAY_*/AWS_* variables behind in os.environ, which the nodes would inherit.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))} | {k: v for k, v in STARTING_ENV.items() if k.startswith(("RAY_", "AWS_"))}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-6000:] + proc.stderr[-2000:]
