"""Ray Train runs on a private local Ray: gathering across ranks, fault tolerance with resume."""

import pytest
import torch

from aem_dist.config import load_config
from aem_dist.engine.checkpoint import load_dir
from aem_dist.engine.inference import evaluate_state
from aem_dist.engine.loop import fit
from tests.core.test_train import metrics_only

pytestmark = pytest.mark.integration


def _cfg(demo_data, *overrides):
    return load_config("demo", [f"data.root={demo_data}", "train.progress=false", "metrics.port=0", "metrics.grace_s=0", *overrides])


def test_two_workers_gather_every_bag_once(local_ray, demo_data, tmp_path):
    from aem_dist.orchestrate.train import train_run

    cfg = _cfg(demo_data, "scaling.num_workers=2", "train.epochs=2")
    results = train_run(cfg, str(tmp_path))
    state = load_dir(str(tmp_path / "best"))
    assert state["epoch"] == results["best_epoch"]
    for split in ("val", "test"):
        # The same checkpoint evaluated by one process over the whole split: equal metrics prove the
        # 2-rank evaluation gathered every bag exactly once (the gather also checks for duplicates).
        single = evaluate_state(state, demo_data, split, max_bags=cfg.train.max_bags_per_batch, max_instances=cfg.train.max_instances_per_batch)
        assert len(single.predictions) == {"val": 32, "test": 48}[split]
        for metric in ("auc", "f1", "acc", "balanced_acc", "attn_entropy"):
            assert results[split][metric] == pytest.approx(single.metrics[metric], abs=1e-6), (split, metric)
    assert results["history"][-1]["train"]["bags"] >= 96  # both ranks' steps are counted


def test_injected_failure_resumes_from_checkpoint(local_ray, demo_data, tmp_path):
    from aem_dist.orchestrate.train import train_run

    overrides = ("scaling.num_workers=1", "train.epochs=3", "model.dropout=0.1")
    results = train_run(_cfg(demo_data, *overrides, "debug.fail_at_epoch=1", "run.max_failures=1"), str(tmp_path))
    assert results["resumed_after_epoch"] == 1  # restarted from the epoch-1 checkpoint, not from scratch
    assert [row["epoch"] for row in results["history"]] == [0, 1, 2]

    assert torch.get_num_threads() == 1  # as in Ray workers (OMP_NUM_THREADS=1): bitwise-equal float sums
    reference = fit(_cfg(demo_data, *overrides))
    assert metrics_only(results["history"]) == metrics_only(reference.history)
    assert results["test"] == reference.test


def test_sweep_over_every_model(local_ray, demo_data, tmp_path):
    from aem_dist.models import MODELS
    from aem_dist.observe.tables import read_csv
    from aem_dist.orchestrate.errors import SweepError
    from aem_dist.orchestrate.sweep import run_sweep

    names = sorted(MODELS)
    cfg = _cfg(demo_data, "scaling.num_workers=0", "train.epochs=1", f"sweep.grid={{model.name: {[*names, 'no-such-model']}}}")
    with pytest.raises(SweepError, match=rf"1 of {len(names) + 1} grid point\(s\) did not finish \(name=no-such-model\); their errors are above"):
        run_sweep(cfg, str(tmp_path))  # a failed trial fails the sweep, after every table is written
    rows = {r["model.name"]: r for r in read_csv(str(tmp_path / "trials.csv"))}
    assert sorted(rows) == sorted([*names, "no-such-model"])
    assert rows.pop("no-such-model")["status"] == "ERROR"
    assert all(r["status"] == "TERMINATED" and 0 <= r["test_auc"] <= 1 for r in rows.values()), rows
    assert {r["trial"] for r in rows.values()} == {f"name={n}" for n in names}
