"""What a resume learns from storage, as data only: finished trials from results.json (never Tune's
pickled state), and whether an earlier sweep exists from its folder's existence alone."""

from __future__ import annotations

import pickle

from aem_dist.config import load_config
from aem_dist.engine.results import stored_config, write_json
from aem_dist.orchestrate.resume import experiment_exists, finished_results


def test_finished_trials_come_from_results_json(tmp_path):
    cfg = load_config("demo", {"train.progress": True})
    run_dir = str(tmp_path / "trial")
    assert finished_results(run_dir, cfg, None) is None
    # written by a Ray worker, which runs with progress bars off: still the same run
    write_json(f"{run_dir}/results.json", {"config": stored_config(load_config("demo", {"train.progress": False})), "best_epoch": 1})
    assert finished_results(run_dir, cfg, None)["best_epoch"] == 1
    assert finished_results(run_dir, load_config("demo", {"loss.lam": 0.5}), None) is None  # another config
    (tmp_path / "trial" / "results.json").write_bytes(pickle.dumps({"config": 1}))  # torn or foreign
    assert finished_results(run_dir, cfg, None) is None


def test_experiment_existence_is_looked_at_not_loaded(tmp_path):
    exp = tmp_path / "ray" / "aem"
    assert not experiment_exists(None, str(exp))
    exp.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"not even a pickle")
    assert experiment_exists(None, str(exp))
