"""Training-level behaviour of the comparison models on the `demo` preset (seconds each).

- MHIM-MIL (EMA teacher, mask schedule) and C2C (per-slide cluster cache): a run interrupted after an
  epoch and resumed from its checkpoint equals an uninterrupted run, metric for metric; the teacher
  moved away from the student's initial weights and the checkpoint carries it and the clusters.
- MHIM-MIL's teacher (and the student's embedding) can start from a trained baseline checkpoint.
- Checkpoints of every new model (read with weights_only=True) predict with per-instance attention.
- IBMIL: one run trains stage 1, builds the confounders, trains stage 2; a rerun reuses stage 1
  (no stage-1 epoch runs again, same confounders); a stage-2 resume equals an uninterrupted run.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from aem_dist.config import load_config
from aem_dist.engine.checkpoint import load_dir
from aem_dist.engine.local import run_local
from aem_dist.engine.loop import fit

from ..core.test_train import metrics_only

FAST = ("train.epochs=3", "loss.lam=0.1")


def _cfg(demo_data, *overrides):
    return load_config("demo", [f"data.root={demo_data}", "train.progress=false", *FAST, *overrides])


def _interrupted_then_resumed(demo_data, tmp_path, *overrides):
    with pytest.raises(RuntimeError, match="injected failure after epoch 0"):
        run_local(_cfg(demo_data, *overrides, "debug.fail_at_epoch=0"), run_dir=str(tmp_path))
    seen: list[int] = []
    resumed = run_local(_cfg(demo_data, *overrides), run_dir=str(tmp_path), on_epoch=lambda r: seen.append(r.epoch))
    assert seen == [1, 2]  # resumed after the checkpointed epoch 0
    return resumed


@pytest.mark.parametrize("name,extra", [("mhim", ("model.mhim_momentum=0.9", "model.dropout=0.2")), ("c2c", ())])
def test_resumed_run_equals_uninterrupted(name, extra, demo_data, tmp_path):
    overrides = (f"model.name={name}", *extra)
    full = fit(_cfg(demo_data, *overrides))
    resumed = _interrupted_then_resumed(demo_data, tmp_path, *overrides)
    assert metrics_only(resumed.history) == metrics_only(full.history)
    assert (resumed.best_epoch, resumed.test) == (full.best_epoch, full.test)
    state = load_dir(str(tmp_path / "checkpoints" / "epoch-000002"))["model"]
    if name == "mhim":
        moved = [float((state[f"teacher.{k.removeprefix('encoder.').replace('.', '__')}"] - v).abs().max()) for k, v in state.items() if k.startswith("encoder.")]
        assert max(moved) > 0  # the teacher is its own state, saved with the model
        assert float(state["progress"]) == pytest.approx(1.0)
    else:
        assert len(state["_extra_state"]["clusters"]) == 96  # every training slide clustered once, saved


def test_ibmil_runs_both_stages_in_one_command_and_reuses_stage_one(demo_data, tmp_path):
    run = tmp_path / "run"
    result = run_local(_cfg(demo_data, "model.name=ibmil"), run_dir=str(run))
    stage1 = run / "stage1"
    conf = np.load(stage1 / "confounders.npy", allow_pickle=False)
    assert conf.shape == (8, 32) and np.isfinite(conf).all()
    assert "epoch-000002" in os.listdir(stage1 / "checkpoints")  # stage 1 ran all its epochs there
    s1 = load_dir(str(stage1 / "best"))
    assert s1["model_meta"]["model"]["ibmil_stage"] == 1 and "confounders" not in s1["model"]
    s2 = load_dir(str(run / "best"))
    torch.testing.assert_close(s2["model"]["confounders"], torch.from_numpy(conf))  # stage 2 trained with them
    assert [r["epoch"] for r in result.history] == [0, 1, 2]  # then stage 2 its own

    # a rerun of stage 2 (its checkpoints gone) reuses stage 1: no stage-1 file is written again
    stamps = {p: p.stat().st_mtime_ns for p in stage1.rglob("*") if p.is_file()}
    for p in (run / "checkpoints").iterdir():
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    again = run_local(_cfg(demo_data, "model.name=ibmil"), run_dir=str(run))
    assert {p: p.stat().st_mtime_ns for p in stage1.rglob("*") if p.is_file()} == stamps
    assert metrics_only(again.history) == metrics_only(result.history)  # same confounders, same stage 2

    # another run pointed at this stage 1 (model.ibmil_stage1) trains only stage 2, and resumes exactly
    other = tmp_path / "other"
    resumed = _interrupted_then_resumed(demo_data, other, "model.name=ibmil", f"model.ibmil_stage1={stage1}")
    assert not (other / "stage1").exists()
    assert metrics_only(resumed.history) == metrics_only(result.history)


def test_ibmil_stage_two_needs_its_confounders(demo_data):
    with pytest.raises(RuntimeError, match="no confounder dictionary"):
        fit(_cfg(demo_data, "model.name=ibmil"))
    with pytest.raises(ValueError, match="needs a run folder"):
        run_local(_cfg(demo_data, "model.name=ibmil"))


@pytest.mark.parametrize("name", ["lossattn", "ilra", "c2c", "mhim", "ibmil"])
def test_checkpoint_predicts_with_attention(name, demo_data, tmp_path):
    from aem_dist.engine.inference import evaluate_state

    result = run_local(_cfg(demo_data, f"model.name={name}", "train.epochs=2"), run_dir=str(tmp_path))
    state = load_dir(str(tmp_path / "best"))  # read back with weights_only=True
    again = evaluate_state(state, demo_data, "test", keep_attention=True)
    best = result.history[result.best_epoch]["test"]
    assert again.metrics["auc"] == pytest.approx(best["auc"], abs=1e-9)
    for pred in again.predictions:
        assert pred.attention is not None and pred.attention.shape == (len(pred.coords),)
        assert pred.attention.sum() == pytest.approx(1.0, abs=1e-6)


def test_mhim_teacher_starts_from_a_trained_baseline(demo_data, tmp_path):
    from aem_dist.engine.stages import model_init
    from aem_dist.models import build_model

    pure = ("model.name=mhim", "model.mhim_mask_ratio=0", "model.mhim_mask_ratio_high=0", "model.mhim_consistency_weight=0")
    run_local(_cfg(demo_data, *pure, "train.epochs=2"), run_dir=str(tmp_path / "baseline"))  # the official 'pure' ABMIL
    baseline = load_dir(str(tmp_path / "baseline" / "best"))["model"]
    cfg = _cfg(demo_data, "model.name=mhim", f"model.mhim_teacher_init={tmp_path / 'baseline' / 'best'}")
    init = model_init(cfg, str(tmp_path / "run"))
    torch.manual_seed(0)
    model = build_model(cfg.model, 32, 2)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    missing, unexpected = model.load_state_dict(init, strict=False)
    assert not unexpected
    teacher = model.teacher_params()
    for name, p in model.encoder.named_parameters():
        torch.testing.assert_close(teacher[name], baseline[f"encoder.{name}"])  # the teacher is the baseline
        expected = baseline[f"encoder.{name}"] if name.startswith("embed.") else fresh[f"encoder.{name}"]
        torch.testing.assert_close(p.detach(), expected)  # the student takes its embedding only ('fc')
    result = run_local(cfg, run_dir=str(tmp_path / "run"))
    assert len(result.history) == 3
    with pytest.raises(ValueError, match="not an mhim baseline"):
        model_init(_cfg(demo_data, "model.name=mhim", f"model.mhim_teacher_init={_abmil_run(demo_data, tmp_path)}"), None)


def _abmil_run(demo_data, tmp_path):
    run_local(_cfg(demo_data, "model.name=abmil", "train.epochs=1"), run_dir=str(tmp_path / "abmil"))
    return tmp_path / "abmil" / "best"
