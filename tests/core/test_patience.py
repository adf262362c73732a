"""train.patience: training stops once the validation score has not improved for N epochs; the selected
epoch is the one the full run had selected among the epochs trained; population members stop individually,
each exactly where its standalone run stops."""

from __future__ import annotations

import pytest

from aem_dist.config import ConfigError, load_config
from aem_dist.engine.checkpoint import state_from_bytes, state_to_bytes
from aem_dist.engine.loop import fit, fit_members
from aem_dist.engine.results import results_dict
from aem_dist.engine.selection import BestTracker
from aem_dist.observe.tables import trial_row
from tests.core.test_population import _assert_same_history, _cfgs, float64, small_data  # noqa: F401  (fixtures)
from tests.core.test_train import metrics_only

EPOCHS = 6
PATIENCE = 2
# The quarter demo's val score plateaus within a few epochs at this lr; with the strict tie rule a plateau does not improve.
SELECT = ["train.select_metric=auc+f1", "train.select_tie=earlier", f"train.epochs={EPOCHS}", "train.lr=1e-2"]


def expected_stop(history, patience, metric="auc+f1", tie="earlier"):
    """Replay the full run's validation scores: (stop epoch or None, best epoch up to it)."""
    t = BestTracker(metric, tie, patience)
    for row in history:
        t.update(row["epoch"], row["val"])
        if t.out_of_patience(row["epoch"]):
            break
    return t.stopped_at, t.best_epoch


def test_patience_stops_at_the_right_epoch_and_keeps_the_selected_epoch(small_data):  # noqa: F811
    full = fit(_cfgs(small_data, "abmil", [{"train.seed": 0}], *SELECT)[0])
    stop, best = expected_stop(full.history, PATIENCE)
    assert stop is not None and stop < EPOCHS - 1, [r["val"]["auc"] for r in full.history]  # the case under test: an early stop
    cfg = _cfgs(small_data, "abmil", [{"train.seed": 0}], *SELECT, f"train.patience={PATIENCE}")[0]
    states = {}
    early = fit(cfg, on_epoch=lambda r: states.setdefault(r.epoch, state_to_bytes(r.state())))
    assert [r["epoch"] for r in early.history] == list(range(stop + 1)) and early.stopped_at == stop
    assert metrics_only(early.history) == metrics_only(full.history[: stop + 1])  # the same training up to the stop
    assert early.best_epoch == best and early.test == full.history[best]["test"]
    record = results_dict(early, cfg)
    assert record["stopped_after_epoch"] == stop and record["config"]["train"]["patience"] == PATIENCE
    assert trial_row("t", {}, record, status="TERMINATED", wall_s=1.0)["epochs"] == stop + 1  # trials.csv: the epochs trained
    # resuming from the stop epoch's checkpoint trains nothing more
    again = fit(cfg, resume=state_from_bytes(states[stop]))
    assert again.stopped_at == stop and len(again.history) == stop + 1 and again.best_epoch == best


def test_a_frozen_model_stops_after_patience_epochs_but_never_at_the_last(small_data):  # noqa: F811
    """lr ~ 0: every epoch scores as epoch 0, which the strict tie rule keeps, so patience 1 runs out at epoch 1."""
    frozen = [*SELECT, "train.lr=1e-12", "train.patience=1"]
    three = fit(_cfgs(small_data, "abmil", [{"train.seed": 0}], *frozen, "train.epochs=3")[0])
    assert (three.stopped_at, three.best_epoch, len(three.history)) == (1, 0, 2)
    two = fit(_cfgs(small_data, "abmil", [{"train.seed": 0}], *frozen, "train.epochs=2")[0])
    assert (two.stopped_at, len(two.history)) == (None, 2)  # it ran every epoch: nothing was stopped


def test_population_members_stop_individually_as_their_standalone_runs(small_data, float64):  # noqa: F811
    members = [{"loss.lam": 0.0, "train.seed": 0}, {"loss.lam": 0.5, "train.seed": 1}]
    cfgs = _cfgs(small_data, "abmil", members, *SELECT, f"train.patience={PATIENCE}")
    reported = []
    pop = fit_members(cfgs, on_epoch=lambda r: reported.append(r.flat()["members"]))
    stops = []
    for k, cfg in enumerate(cfgs):
        solo = fit(cfg)
        _assert_same_history(pop[k].history, solo.history)
        assert (pop[k].best_epoch, pop[k].stopped_at) == (solo.best_epoch, solo.stopped_at)
        stops.append(solo.stopped_at)
    assert None not in stops and len(set(stops)) == 2, stops  # members stop at different epochs
    # the population trains until its last member stops; the first keeps reporting its last epoch
    assert len(reported) == max(stops) + 1
    first = stops.index(min(stops))
    assert [m[first]["epoch"] for m in reported] == [*range(min(stops) + 1), *[min(stops)] * (max(stops) - min(stops))]


def test_patience_needs_a_score_and_a_val_split():
    with pytest.raises(ConfigError, match="train.patience needs a score that can stop improving"):
        load_config("demo", ["train.patience=3", "train.select_metric=last"])
    with pytest.raises(ConfigError, match="train.patience"):
        load_config("demo", ["train.patience=0"])
