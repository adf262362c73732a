"""`ray job submit` of the documented entrypoint to a private Ray head (the RayJob runs the same string)."""

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from aem_dist.observe.tables import read_csv
from tests.fixtures.ray_cluster import ray_bin

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CLUSTER_CONFIG = "configs/cluster-sweep.yaml"
CLUSTER_OUT = "s3://aem-results/camelyon16-sweep"


def documented_entrypoint() -> str:
    job = yaml.safe_load((REPO / "cluster/kuberay/rayjob-sweep.yaml").read_text())
    entrypoint = " ".join(job["spec"]["entrypoint"].split())
    assert entrypoint in (REPO / "README.md").read_text(), "README must document the RayJob's exact command"
    return entrypoint


def test_documented_sweep_command_runs_as_a_ray_job(ray_head, demo_data, tmp_path):
    entrypoint = documented_entrypoint()
    assert CLUSTER_CONFIG in entrypoint and CLUSTER_OUT in entrypoint
    # One command for the first submission and every retry (KubeRay reruns the identical entrypoint): it
    # carries --resume, which on an empty --out (as here) starts a fresh sweep. Resubmission after a killed
    # driver: tests/orchestrate/test_multinode_job.py.
    assert entrypoint.endswith(" --resume")
    out = tmp_path / "sweep"
    # The same command on the demo config and a local output, made small enough for a test.
    command = entrypoint.replace(CLUSTER_CONFIG, "configs/demo.yaml").replace(CLUSTER_OUT, str(out))
    overrides = [
        f"data.root={demo_data}", "train.epochs=2", "sweep.grid={loss.lam: [0.0, 0.1]}",
        "metrics.port=0", "metrics.grace_s=0", "train.progress=false",
    ]  # fmt: skip
    command += "".join(f" --set {shlex.quote(o)}" for o in overrides)
    submit = [ray_bin(), "job", "submit", "--address", ray_head.dashboard_url, "--working-dir", str(REPO), "--", *shlex.split(command)]
    proc = subprocess.run(submit, env=ray_head.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout.lower()
    rows = read_csv(str(out / "trials.csv"))
    assert sorted(r["loss.lam"] for r in rows) == [0.0, 0.1] and all(r["status"] == "TERMINATED" for r in rows)
    assert (out / "summary.md").exists() and (out / "run.json").exists()
    assert all((out / "trials" / r["trial"] / "best" / "state.pt").exists() for r in rows)
