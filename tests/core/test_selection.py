"""Best-epoch selection: NaN never wins, documented ties, loss/last, checkpointable state, val warnings."""

import math

import pytest

from aem_dist.config import load_config
from aem_dist.engine.loop import fit
from aem_dist.engine.selection import BestTracker, val_split_warnings

NAN = float("nan")


def test_nan_val_auc_never_selects_an_epoch_by_default():
    t = BestTracker()
    assert not t.update(0, {"auc": NAN, "f1": 0.9, "loss": 0.7})  # a class missing from val: AUC undefined
    assert t.best_epoch is None
    assert t.update(1, {"auc": 0.6, "f1": 0.5, "loss": 0.9})
    assert not t.update(2, {"auc": NAN, "f1": 1.0, "loss": 0.1})
    assert t.best_epoch == 1 and t.best_score == pytest.approx(1.1)


def test_saturated_val_auc_moves_to_the_later_or_lower_loss_epoch():
    t = BestTracker("auc")
    for epoch, loss in enumerate([0.6, 0.5, 0.4, 0.45]):
        t.update(epoch, {"auc": 1.0, "f1": 1.0, "loss": loss})
    assert t.best_epoch == 2  # equal AUC 1.0: the lowest val loss
    strict = BestTracker("auc", tie="earlier")
    for epoch in range(4):
        strict.update(epoch, {"auc": 1.0, "loss": 0.5})
    assert strict.best_epoch == 0


def test_loss_and_last_metrics_and_state_round_trip():
    t = BestTracker("loss")
    for epoch, loss in enumerate([0.7, 0.3, 0.5]):
        t.update(epoch, {"auc": 0.5, "f1": 0.5, "loss": loss})
    assert t.best_epoch == 1
    u = BestTracker("loss")
    u.load_state_dict(t.state_dict())
    assert not u.update(3, {"loss": 0.31}) and u.update(4, {"loss": 0.2}) and u.best_epoch == 4
    last = BestTracker("last")
    assert all(last.update(e, {"auc": NAN}) for e in range(3)) and last.best_epoch == 2
    with pytest.raises(ValueError, match="train.select_metric"):
        BestTracker("acc")


def test_small_or_incomplete_val_split_warns():
    msgs = val_split_warnings(4, [4, 0], ["normal", "tumor"])
    assert any("only 4 bags" in m for m in msgs) and any("tumor" in m for m in msgs)
    assert val_split_warnings(40, [20, 20], ["normal", "tumor"]) == []


def test_fit_reports_the_selected_epoch_and_select_last(demo_data):
    cfg = load_config("demo", [f"data.root={demo_data}", "train.progress=false", "train.epochs=3", "train.select_metric=last"])
    result = fit(cfg)
    assert result.best_epoch == 2 and result.test == result.history[-1]["test"]
    assert not math.isnan(result.history[-1]["val"]["loss"])
