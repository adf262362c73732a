"""`ray job submit` of the documented sweep command to a multi-node cluster, its driver killed, the same
command submitted again. Run by tests/orchestrate/test_multinode_job.py in a fresh Python process (this
file is not collected on its own; see multinode_cases.py for why Ray cases get their own process)."""

import json
import os
import shlex
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from aem_dist import storage
from aem_dist.config import load_config
from aem_dist.engine.loop import fit
from aem_dist.engine.results import results_dict
from aem_dist.observe.tables import read_csv, trial_row, write_tables
from aem_dist.config import grid_points
from aem_dist.orchestrate.trials import trial_name
from tests.fixtures.ray_cluster import ray_bin
from tests.orchestrate.test_job_submit import CLUSTER_CONFIG, CLUSTER_OUT, documented_entrypoint

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = "configs/demo.yaml"
GRID = {"train.seed": [0, 1], "loss.lam": [0.0, 0.1]}
# Small enough for CI: 4 one-point trials (no populations: each finishes on its own), 2 epochs, trained
# in the trial's own process, no report (its plots are test_sweep.py's). What is under test is the job's
# driver, not Ray Train's workers.
SMALL = {"train.epochs": 2, "scaling.num_workers": 0, "sweep.population": "off", "sweep.report": False, "train.progress": False}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _job(url: str, submission_id: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/jobs/{submission_id}", timeout=10) as r:
        return json.loads(r.read())


def _wait(what: str, check, timeout_s: float = 300.0, every_s: float = 0.3):
    """Poll ``check()`` until it returns something truthy (returned); a hang guard, not a timing assert."""
    deadline = time.time() + timeout_s
    while not (value := check()):
        assert time.time() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(every_s)
    return value


def test_resubmitted_job_completes_only_unfinished_trials(ray_multinode_jobs, s3_server, demo_data, tmp_path):
    from ray.util.state import list_actors

    cluster = ray_multinode_jobs
    options = s3_server.options()
    bucket = s3_server.make_bucket("jobresubmit")
    s3, _ = storage.open_fs(bucket, options)
    s3.put(str(demo_data) + "/", "jobresubmit/demo/", recursive=True)
    out = f"{bucket}/sweep"
    results_glob = "jobresubmit/sweep/trials/*/results.json"
    checkpoints_glob = "jobresubmit/sweep/trials/*/checkpoints/epoch-*/state.pt"  # a num_workers-0 trial's, per epoch

    # The RayJob's (= README's) entrypoint, unchanged but for the config, --out and small-run overrides. It
    # carries --resume: KubeRay reruns the identical string, so the first run and every rerun are one command.
    entrypoint = documented_entrypoint()
    assert entrypoint.endswith(" --resume")
    overrides = {"data.root": f"{bucket}/demo", **SMALL, "sweep.grid": json.dumps(GRID), "metrics.port": 0, "metrics.grace_s": 0}
    command = entrypoint.replace(CLUSTER_CONFIG, DEMO_CONFIG).replace(CLUSTER_OUT, out)
    command += "".join(f" --set {shlex.quote(f'{k}={v}')}" for k, v in overrides.items())
    # Endpoint and credentials reach the driver and trials only as the nodes' AWS_* environment (as a
    # KubeRay pod gets them from a Secret): never in the command.
    assert s3_server.secret not in command and s3_server.key not in command

    def submit(submission_id: str, *flags: str) -> subprocess.CompletedProcess:
        argv = [ray_bin(), "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO), "--submission-id", submission_id, *flags, "--", *shlex.split(command)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=600)

    first = submit("sweep-1", "--no-wait")
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]

    def first_job_logs() -> str:
        with urllib.request.urlopen(f"{cluster.dashboard_url}/api/jobs/sweep-1/logs", timeout=10) as r:
            return json.loads(r.read())["logs"]

    def some_finished():
        job = _job(cluster.dashboard_url, "sweep-1")
        assert job["status"] not in TERMINAL, f"the first job ended before it was killed: {job['status']}\n{first_job_logs()[-4000:]}"
        s3.invalidate_cache()  # s3fs caches listings; each poll must see the bucket as it is now
        done = {p.split("/")[-2] for p in s3.glob(results_glob)}
        midway = {p.split("/")[-4] for p in s3.glob(checkpoints_glob)} - done
        # Kill once a trial has finished and another stands at a checkpoint, or else once two have finished:
        # trials run two at a time, so a third has yet to start up then, let alone finish.
        return job if job.get("driver_info") and done and (midway or len(done) >= 2) else None

    # Once some trials have finished (their results.json, written last, is on S3), the driver dies as a
    # pre-empted head pod's would: SIGKILL, no chance to clean up or to record anything.
    job = _wait("trials of the first job finishing", some_finished)
    os.kill(int(job["driver_info"]["pid"]), signal.SIGKILL)
    job = _wait("the first job ending", lambda: (j := _job(cluster.dashboard_url, "sweep-1"))["status"] in TERMINAL and j)
    assert job["status"] == "FAILED", job
    # The dead driver's trials (its job's actors) die with it; wait until none is left, so none can still
    # write results.
    alive = [("job_id", "=", job["job_id"]), ("state", "=", "ALIVE")]
    _wait("the first job's trials exiting", lambda: not list_actors(address=cluster.dashboard_url, filters=alive))
    assert list_actors(address=cluster.dashboard_url, filters=alive[:1])  # the filter names the job's (dead) trials
    s3.invalidate_cache()
    finished = {p: (s3.cat_file(p), s3.info(p)["LastModified"]) for p in s3.glob(results_glob)}
    assert 1 <= len(finished) < 4, sorted(finished)
    partial = {}  # unfinished trial → its last checkpointed epoch
    for path in s3.glob(checkpoints_glob):
        trial, epoch = path.split("/")[-4], int(path.split("/")[-2].removeprefix("epoch-"))
        if f"jobresubmit/sweep/trials/{trial}/results.json" not in finished:
            partial[trial] = max(epoch, partial.get(trial, -1))
    assert not s3.exists("jobresubmit/sweep/trials.csv")  # the sweep did not get to its tables

    second = submit("sweep-2")
    logs = second.stdout + second.stderr
    assert second.returncode == 0 and "succeeded" in second.stdout.lower(), logs[-4000:]
    assert "resuming sweep" in logs, logs[-4000:]
    for text in (logs, first_job_logs()):
        assert s3_server.secret not in text and s3_server.key not in text

    # Only the rest ran: every finished trial's results.json is the very object the first job wrote.
    s3.invalidate_cache()
    for path, (content, modified) in finished.items():
        assert s3.cat_file(path) == content and s3.info(path)["LastModified"] == modified, path
    assert len(s3.glob(results_glob)) == 4
    for path in s3.glob(results_glob):
        result = json.loads(s3.cat_file(path))
        assert result["trial_node_id"] in cluster.node_ids.values()  # trained on this cluster's worker nodes
        if path not in finished:  # ... and the others continued from their last checkpoint, if any
            assert result["resumed_after_epoch"] == partial.get(path.split("/")[-2]), (path, partial)

    # The final tables equal an uninterrupted sweep's: each grid point trained without Ray (the same loop
    # a num_workers-0 trial runs; CPU, one thread in both) and tabulated by the same functions.
    reference = str(tmp_path / "reference")
    rows = []
    for values in grid_points(GRID):
        cfg = load_config(str(REPO / DEMO_CONFIG), {"data.root": str(demo_data), **SMALL, **values})
        rows.append(trial_row(trial_name(values), values, results_dict(fit(cfg), cfg), status="TERMINATED", wall_s=None))
    write_tables(reference, rows, list(GRID))

    def comparable(rows):
        return [{k: v for k, v in r.items() if k not in ("wall_s", "path")} for r in rows]

    assert comparable(read_csv(f"{out}/trials.csv", options)) == comparable(read_csv(f"{reference}/trials.csv"))
    for name in ("summary.csv", "summary.md"):
        assert storage.read_bytes(f"{out}/{name}", options) == Path(reference, name).read_bytes(), name
    assert not s3.exists("jobresubmit/sweep/report.md")  # sweep.report false: the tables only
    print(f"finished before the kill: {sorted(p.split('/')[-2] for p in finished)}; resumed from a checkpoint: {partial}")
