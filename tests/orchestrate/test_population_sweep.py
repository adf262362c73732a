"""Fused sweeps on a private local Ray: the same tables and files as one trial per grid point."""

import json
import os

import pytest

from aem_dist.config import load_config
from aem_dist.observe.tables import read_csv

pytestmark = pytest.mark.integration

GRID = "sweep.grid={train.seed: [0, 1], loss.lam: [0.0, 0.1]}"
METRICS = ("best_epoch", "val_auc", "val_f1", "test_auc", "test_f1", "test_attn_entropy")


def _sweep(demo_data, out, *overrides):
    from aem_dist.orchestrate.sweep import run_sweep

    announced = []
    cfg = load_config("demo", [f"data.root={demo_data}", "train.progress=false", "metrics.port=0", "metrics.grace_s=0", "train.epochs=2", "train.data_seed=0", GRID, *overrides])
    run_sweep(cfg, str(out), announce=announced.append)
    return {r["trial"]: r for r in read_csv(str(out / "trials.csv"))}, announced


def _files(out):
    """What a grid point leaves for its user (resume checkpoints aside: a population keeps one set for all
    its members under populations/<name>/, an unfused in-process trial under trials/<name>/checkpoints)."""
    return sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out / "trials") for f in fs if "checkpoints" not in d)


@pytest.fixture(scope="module")
def fused_in_trial(local_ray_session, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweeps") / "fused"
    rows, said = _sweep(demo_data, out, "scaling.num_workers=0")
    return out, rows, said


def _assert_same_rows(got, want, tol=1e-5):
    assert sorted(got) == sorted(want) == ["lam=0.0_seed=0", "lam=0.0_seed=1", "lam=0.1_seed=0", "lam=0.1_seed=1"]
    for name, row in want.items():
        assert got[name]["status"] == row["status"] == "TERMINATED"
        for key in METRICS:
            assert got[name][key] == pytest.approx(row[key], abs=tol), (name, key)


def test_fused_sweep_equals_unfused_sweep(local_ray, fused_in_trial, demo_data, tmp_path):
    out, fused, said = fused_in_trial
    assert any("4 grid point(s) in 1 population(s)" in s for s in said), said
    unfused, said_off = _sweep(demo_data, tmp_path / "unfused", "scaling.num_workers=0", "sweep.population=off")
    assert not any("population(s)" in s for s in said_off)
    _assert_same_rows(fused, unfused)
    assert _files(out) == _files(tmp_path / "unfused")
    run = json.loads((out / "run.json").read_text())
    assert run["populations"] == [["lam=0.0_seed=0", "lam=0.1_seed=0", "lam=0.0_seed=1", "lam=0.1_seed=1"]]
    # each member's best state loads like a standalone run's and is the member's own
    from aem_dist.engine.checkpoint import load_dir
    from aem_dist.engine.inference import evaluate_state

    member = out / "trials" / "lam=0.1_seed=1"
    state = load_dir(str(member / "best"))
    res = json.loads((member / "results.json").read_text())
    assert state["epoch"] == res["best_epoch"] and res["config"]["loss"]["lam"] == 0.1 and res["config"]["train"]["seed"] == 1
    again = evaluate_state(state, demo_data, "test", max_bags=8, max_instances=4096)
    assert again.metrics["auc"] == pytest.approx(res["test"]["auc"], abs=1e-6)


def test_population_in_a_torch_trainer_equals_in_trial(local_ray, fused_in_trial, demo_data, tmp_path):
    """The same population as a 1-worker Ray Train run (TorchTrainer, checkpoints via Ray) gives the
    same numbers as inside the Tune trial."""
    _, in_trial, _ = fused_in_trial
    in_trainer, _ = _sweep(demo_data, tmp_path / "trainer", "scaling.num_workers=1")
    _assert_same_rows(in_trainer, in_trial, tol=1e-9)
