"""Preflight: a wrong dataset, model, grid key, output or resource request is one line within seconds,
before Ray starts (aem_dist.orchestrate.preflight). The cluster checks take ray.nodes()'s plain list."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from aem_dist.config import ConfigError, load_config
from aem_dist.models import MODELS
from aem_dist.orchestrate.errors import PreflightError
from aem_dist.orchestrate.plan import SweepPlan
from aem_dist.orchestrate.preflight import check_cluster, check_config, storage_locations

REPO = Path(__file__).resolve().parents[2]


def _cfg(root, **overrides):
    return load_config("demo", {"data.root": str(root), **overrides})


def test_issue_example_fails_in_seconds_without_ray(tmp_path):
    """The issue's new-user example: `train` with model.name=nope and a wrong data.root."""
    private_tmp = Path(tempfile.mkdtemp(prefix="aempf-", dir="/tmp"))  # a private Ray would be created in here
    try:
        wrong = tmp_path / "no-such-dataset"
        cmd = [
            sys.executable, "-m", "aem_dist", "train", "--config", "configs/demo.yaml", "--out", str(tmp_path / "run"),
            "--set", "model.name=nope", "--set", f"data.root={wrong}",
        ]  # fmt: skip
        env = {**os.environ, "TMPDIR": str(private_tmp)}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # a hang guard, not a timing assert
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr[-3000:]  # one line, nothing after it
        assert f"data.root={wrong}" in errors[0] and "no manifest" in errors[0]
        assert "model.name='nope'" in errors[0] and "abmil" in errors[0]  # names the key and lists the known models
        assert "Traceback" not in proc.stderr
        assert not list(private_tmp.glob("aem-ray-*")), "a private Ray was started"
        assert not (tmp_path / "run").exists()  # nothing was written either
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)


def test_unknown_model_in_grid_lists_known_models(demo_data):
    cfg = _cfg(demo_data, **{"sweep.grid": {"model.name": ["abmil", "nope"]}})
    with pytest.raises(PreflightError) as info:
        check_config(cfg, "unused-out", sweep=True)
    msg = str(info.value)
    assert "model.name='nope' is not a known model" in msg and all(name in msg for name in MODELS)
    assert "\n" not in msg
    check_config(cfg, "unused-out", sweep=False)  # a single run ignores sweep.grid: the base config is fine


def test_bad_grid_key_names_it(demo_data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from aem_dist.cli import app

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a private Ray would make its aem-ray-* dir
    args = ["sweep", "--config", "demo", "--out", str(tmp_path / "out"), "--set", f"data.root={demo_data}", "--set", "sweep.grid={train.sed: [0, 1]}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "unknown config key 'train.sed'" in result.output
    assert not list(tmp_path.glob("aem-ray-*")) and not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"sweep\.grid point \{loss\.lam: -1\}: .*loss\.lam"):  # a bad value, at every point
        check_config(_cfg(demo_data, **{"sweep.grid": {"loss.lam": [0.1, -1]}}), "unused-out", sweep=True)


def test_wrong_data_root_in_grid_names_the_url(demo_data, tmp_path):
    wrong = str(tmp_path / "elsewhere")
    cfg = _cfg(demo_data, **{"sweep.grid": {"data.root": [str(demo_data), wrong]}})
    with pytest.raises(PreflightError, match=rf"^data\.root={wrong} is not a readable dataset: .*no manifest"):
        check_config(cfg, "unused-out", sweep=True)


@pytest.mark.integration
def test_unwritable_s3_output_fails_before_ray(s3_server, demo_data, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    cfg = _cfg(demo_data, **{"run.storage_path": "s3://no-such-bucket-pf/ray"})
    good = s3_server.make_bucket("preflight") + "/sweep"
    with pytest.raises(PreflightError) as info:
        check_config(cfg, good, sweep=True)
    assert str(info.value).startswith("run.storage_path=s3://no-such-bucket-pf/ray is not writable") and "does not exist" in str(info.value)
    assert "--out" not in str(info.value)  # the good bucket passes
    assert s3_server.secret not in str(info.value)


def _node(node_id, alive=True, **resources):
    return {"NodeID": node_id, "Alive": alive, "Resources": resources}


def test_cluster_bundle_must_fit_one_node(demo_data):
    two_small = [_node("aa", CPU=2.0), _node("bb", CPU=2.0), _node("dead", alive=False, CPU=64.0)]
    s3_cfg = {"data.root": "s3://b/d", "run.storage_path": "s3://b/r"}
    # 4 CPUs in the cluster, but no one node has the 3 a trial asks for (the dead one does not count).
    cfg = load_config("demo", {**s3_cfg, "scaling.num_workers": 0, "sweep.trial_cpus": 3})
    with pytest.raises(PreflightError, match=r"one trial needs CPU 3 \(sweep\.trial_cpus, sweep\.trial_gpus\) but no node .*node aa: CPU 2; node bb: CPU 2$"):
        check_cluster(SweepPlan.build(cfg, sweep=True), "s3://b/out", two_small)
    # A GPU per Ray Train worker on a CPU-only cluster.
    cfg = load_config("demo", {**s3_cfg, "scaling.num_workers": 1, "scaling.use_gpu": True})
    with pytest.raises(PreflightError, match=r"one Ray Train worker needs CPU 1, GPU 1 \(sweep\.trial_cpus, scaling\.use_gpu, sweep\.trial_gpus\)"):
        check_cluster(SweepPlan.build(cfg, sweep=False), "s3://b/out", two_small)
    # A custom resource that only one node has is fine.
    cfg = load_config("demo", {**s3_cfg, "scaling.num_workers": 1, "scaling.resources_per_worker": {"CPU": 1, "node_b": 1}})
    check_cluster(SweepPlan.build(cfg, sweep=False), "s3://b/out", [_node("aa", CPU=2.0), _node("bb", CPU=1.0, node_b=1.0)])


def test_local_paths_refused_only_on_several_nodes(demo_data, tmp_path):
    cfg = _cfg(demo_data, **{"sweep.grid": {"loss.lam": [0.0, 0.1]}})
    check_cluster(SweepPlan.build(cfg), str(tmp_path), [_node("aa", CPU=2.0), _node("gone", alive=False)])  # one alive node
    with pytest.raises(PreflightError) as info:
        check_cluster(SweepPlan.build(cfg), str(tmp_path), [_node("head"), _node("aa", CPU=2.0)])
    msg = str(info.value)
    assert f"data.root={demo_data}" in msg and f"--out={tmp_path}" in msg and "s3://" in msg and "2 nodes" in msg
    remote = load_config("demo", {"data.root": "s3://b/d"})
    with pytest.raises(PreflightError, match=r"--out=.* is a local path"):
        check_cluster(SweepPlan.build(remote, sweep=False), str(tmp_path), [_node("head"), _node("aa", CPU=2.0)])
    check_cluster(SweepPlan.build(remote, sweep=False), "s3://b/out", [_node("head"), _node("aa", CPU=2.0)])


def test_storage_locations_probed_from_every_node(demo_data, tmp_path):
    """What each node's probe checks: every point's remote data.root (read), a remote --out and
    run.storage_path (written); local paths are not probed (check_cluster refuses them on a cluster)."""
    cfg = load_config("demo", {"data.root": "s3://b/d", "run.storage_path": "s3://b/ray", "sweep.grid": {"data.root": ["s3://b/d", "s3://b/e", str(demo_data)], "loss.lam": [0.0, 0.1]}})
    assert storage_locations(SweepPlan.build(cfg), "s3://b/out") == [("data.root", "s3://b/d", False), ("--out", "s3://b/out", True), ("run.storage_path", "s3://b/ray", True), ("data.root", "s3://b/e", False)]
    assert storage_locations(SweepPlan.build(cfg, sweep=False), str(tmp_path)) == [("data.root", "s3://b/d", False), ("run.storage_path", "s3://b/ray", True)]
