"""Ray callbacks: the Tune callback driven through its hooks with real Trial objects; the Train bridge
under a real 2-worker TorchTrainer on a private local Ray."""

from __future__ import annotations

import io

import pytest
import ray.cloudpickle as cloudpickle
from ray.tune.experiment import Trial

from aem_dist.config import MetricsSection, load_config
from aem_dist.observe.callbacks import TuneMetricsCallback, config_value, trial_labels, tune_metrics
from aem_dist.observe.metrics import MetricsExporter


def trials(grid) -> list[Trial]:
    # stub=True: a real Trial without registering a trainable (what Tune builds from saved state).
    return [Trial("aem_trial", config=cfg, trial_id=f"{i:05d}", stub=True) for i, cfg in enumerate(grid)]


def result(epoch: int, instances: int = 1000) -> dict:
    return {"epoch": epoch, "train/loss": 0.7 - 0.1 * epoch, "train/instances": instances, "train/bags": 10, "val/auc": 0.8, "test/auc": 0.75,
            "val/attn_entropy": 4.0, "time/step_s": [0.1, 0.2], "training_iteration": epoch + 1, "checkpoint_path": "/x"}


def sample(exporter, name, **labels):
    return exporter.registry.get_sample_value(name, labels)


def test_config_values_flat_or_nested():
    assert config_value({"loss.lam": 0.1}, "loss.lam") == 0.1
    assert config_value({"loss": {"lam": 0.2}}, "loss.lam") == 0.2
    assert config_value({}, "loss.lam") is None
    base = load_config("demo", ["run.name=sw", "model.name=abmil", "train.seed=7"])
    # swept keys from the trial, the rest from the base config
    assert trial_labels(base, "t0", {"loss.lam": 0.005}) == {"run": "sw", "trial": "t0", "lam": "0.005", "seed": "7", "model": "abmil"}


def test_tune_callback_feeds_exporter_and_tracks_states():
    base = load_config("demo", ["run.name=sweep-x", "train.epochs=2"])
    exporter = MetricsExporter(MetricsSection(port=0))
    out = io.StringIO()
    cb = TuneMetricsCallback(base, exporter, stream=out, interval_s=3600)
    ts = trials([{"loss.lam": lam, "train.seed": seed} for lam in (0.0, 0.1) for seed in (0, 1)])
    cb.on_step_end(iteration=0, trials=ts)  # all pending
    assert sample(exporter, "aem_trials", state="pending") == 4

    ts[0].set_status(Trial.RUNNING)
    cb.on_trial_start(iteration=1, trials=ts, trial=ts[0])
    cb.on_trial_result(iteration=2, trials=ts, trial=ts[0], result=result(0))
    cb.on_trial_result(iteration=3, trials=ts, trial=ts[0], result=result(0))  # the same epoch twice
    cb.on_trial_result(iteration=4, trials=ts, trial=ts[0], result=result(1))
    labels0 = {"run": "sweep-x", "trial": "aem_trial_00000", "lam": "0", "seed": "0", "model": "abmil"}
    assert sample(exporter, "aem_instances_processed_total", **labels0) == 2000
    assert sample(exporter, "aem_train_loss", **labels0) == pytest.approx(0.6)
    assert sample(exporter, "aem_eval_auc", **labels0, split="test") == pytest.approx(0.75)
    assert sample(exporter, "aem_step_duration_seconds_count", **labels0) == 4

    ts[2].set_status(Trial.RUNNING)
    cb.on_trial_start(iteration=5, trials=ts, trial=ts[2])
    cb.on_trial_result(iteration=6, trials=ts, trial=ts[2], result=result(0, 500))
    labels2 = {**labels0, "trial": "aem_trial_00002", "lam": "0.1"}
    assert sample(exporter, "aem_instances_processed_total", **labels2) == 500

    ts[0].set_status(Trial.TERMINATED)
    cb.on_trial_complete(iteration=7, trials=ts, trial=ts[0])
    ts[2].set_status(Trial.ERROR)
    cb.on_trial_error(iteration=8, trials=ts, trial=ts[2])
    assert cb.counts() == {"pending": 2, "running": 0, "terminated": 1, "error": 1}
    assert sample(exporter, "aem_trials", state="terminated") == 1
    assert sample(exporter, "aem_trials", state="error") == 1

    # Tune's statuses at the end of a step are the ground truth (e.g. a trial it started without telling us)
    ts[1].set_status(Trial.RUNNING)
    cb.on_step_end(iteration=9, trials=ts)
    assert cb.counts() == {"pending": 1, "running": 1, "terminated": 1, "error": 1}
    cb.on_experiment_end(trials=ts)

    # the live table: changed rows at each state change, a full table with final states at the end
    text = out.getvalue()
    last = text.strip().split("[sweep-x]")[-1]
    assert "1 of 4 grid points finished · 1 running · 1 pending · 1 error  (all grid points)" in last
    for line in ("aem_trial_00000  0    0     finished  2/2    0.6000  0.8000   0.7500", "aem_trial_00002  0.1  0     error     1/2"):
        assert line in last, last


def test_tune_callback_survives_tuner_pickling():
    # Tune pickles the RunConfig (callbacks included) into tuner.pkl: the server must not go with it.
    exporter = MetricsExporter(MetricsSection(port=0))
    exporter.start()
    try:
        cb = TuneMetricsCallback(load_config("demo"), exporter, print_table=False)
        ts = trials([{"loss.lam": 0.1}])
        cb.on_trial_start(iteration=0, trials=ts, trial=ts[0])
        clone = cloudpickle.loads(cloudpickle.dumps(cb))
        assert clone.exporter is None and clone.counts()["running"] == 1
        clone.on_trial_result(iteration=1, trials=ts, trial=ts[0], result=result(0))  # still works, feeds nothing
    finally:
        exporter.stop()


def test_live_table_shows_the_best_epochs_test_auc():
    cb = TuneMetricsCallback(load_config("demo"), None, print_table=False)
    ts = trials([{"loss.lam": 0.1}])
    cb.on_trial_start(iteration=0, trials=ts, trial=ts[0])
    cb.on_trial_result(iteration=1, trials=ts, trial=ts[0], result={**result(0), "best/epoch": 0, "test/auc": 0.9})
    cb.on_trial_result(iteration=2, trials=ts, trial=ts[0], result={**result(1), "best/epoch": 0, "test/auc": 0.6})
    row = cb.table().splitlines()[2]
    assert "test_auc@best" in cb.table() and row.endswith("0.9000"), row


def test_a_population_trial_is_one_row_and_one_series_per_member():
    """A fused trial reports every member (``members`` in its result): the live table and the
    Prometheus series stay per grid point, labelled like unfused trials."""
    base = load_config("demo", ["run.name=fused"])
    exporter = MetricsExporter(MetricsSection(port=0))
    out = io.StringIO()
    cb = TuneMetricsCallback(base, exporter, stream=out, interval_s=3600)
    members = [{"name": f"lam={lam}_seed=0", "values": {"loss.lam": lam, "train.seed": 0}} for lam in (0.0, 0.1, 0.5)]
    (trial,) = trials([{"_population": {"name": "pop_lam=0.0_seed=0+2", "members": members}}])
    trial.set_status(Trial.RUNNING)
    cb.on_trial_start(iteration=0, trials=[trial], trial=trial)
    per_member = [result(0) | {"test/auc": 0.6 + 0.1 * k, "best/epoch": 0} for k in range(3)]
    cb.on_trial_result(iteration=1, trials=[trial], trial=trial, result=tune_metrics(result(0) | {"members": per_member}))
    assert cb.counts()["running"] == 3
    for k, m in enumerate(members):
        labels = {"run": "fused", "trial": m["name"], "lam": format(m["values"]["loss.lam"], "g"), "seed": "0", "model": "abmil"}
        assert sample(exporter, "aem_eval_auc", **labels, split="test") == pytest.approx(0.6 + 0.1 * k)
    table = cb.table()
    assert all(m["name"] in table for m in members) and "0 of 3 grid points finished · 3 running" in table


def test_planned_grid_points_count_as_pending_until_tune_creates_them():
    """Tune creates trials as it goes: the header and aem_trials count the plan's grid points from the start."""
    exporter = MetricsExporter(MetricsSection(port=0))
    out = io.StringIO()
    names = [f"lam={lam}_seed={s}" for lam in (0.0, 0.1, 0.5) for s in (0, 1)]
    cb = TuneMetricsCallback(load_config("demo", ["run.name=plan"]), exporter, planned=names, stream=out)
    ts = trials([{"loss.lam": 0.0, "train.seed": 0}, {"loss.lam": 0.0, "train.seed": 1}])  # Tune made 2 of 6 so far
    cb.on_step_end(iteration=0, trials=ts)
    assert sample(exporter, "aem_trials", state="pending") == 6 and "0 of 6 grid points finished · 0 running · 6 pending" in out.getvalue()
    ts[0].set_status(Trial.RUNNING)
    cb.on_step_end(iteration=1, trials=ts)
    assert sample(exporter, "aem_trials", state="pending") == 5 and sample(exporter, "aem_trials", state="running") == 1


def test_blocks_list_changed_rows_only_and_epochs_at_most_every_interval():
    out = io.StringIO()
    cb = TuneMetricsCallback(load_config("demo", ["run.name=q", "train.epochs=3"]), None, stream=out, interval_s=3600, full_every_s=3600)
    ts = trials([{"loss.lam": lam, "train.seed": 0} for lam in (0.0, 0.1, 0.5)])
    cb.on_step_end(iteration=0, trials=ts)  # the announcement, no rows yet
    ts[0].set_status(Trial.RUNNING)
    cb.on_trial_start(iteration=1, trials=ts, trial=ts[0])
    cb.on_step_end(iteration=1, trials=ts)
    block = out.getvalue().split("[q]")[-1]
    assert "aem_trial_00000" in block and "aem_trial_00001" not in block  # only the row that changed
    before = out.getvalue()
    for epoch in range(2):  # epochs alone wait for the interval (an hour here): nothing printed
        cb.on_trial_result(iteration=2 + epoch, trials=ts, trial=ts[0], result=result(epoch))
        cb.on_step_end(iteration=2 + epoch, trials=ts)
    assert out.getvalue() == before
    ts[0].set_status(Trial.TERMINATED)  # a state change prints at the next step, with the epochs seen since
    cb.on_trial_complete(iteration=5, trials=ts, trial=ts[0])
    ts[1].set_status(Trial.RUNNING)
    cb.on_step_end(iteration=5, trials=ts)
    block = out.getvalue()[len(before):]
    assert block.count("[q]") == 1 and "aem_trial_00002" not in block
    assert "aem_trial_00000  0    0     stopped early  2/3" in block  # 2 of its 3 epochs, then completed
    assert "aem_trial_00001  0.1  0     running" in block


def test_fold_column_when_folds_are_swept_and_a_full_table_at_the_end():
    out = io.StringIO()
    cb = TuneMetricsCallback(load_config("demo", ["run.name=cv", "train.epochs=1"]), None, stream=out)
    ts = trials([{"data.fold": f, "loss.lam": 0.1, "train.seed": 0} for f in (0, 1)])
    for t in ts:
        t.set_status(Trial.RUNNING)
        cb.on_trial_start(iteration=0, trials=ts, trial=t)
        cb.on_trial_result(iteration=1, trials=ts, trial=t, result=result(0))
        t.set_status(Trial.TERMINATED)
        cb.on_trial_complete(iteration=2, trials=ts, trial=t)
    cb.on_experiment_end(trials=ts)
    final = out.getvalue().split("[cv]")[-1].splitlines()
    assert "2 of 2 grid points finished" in final[0] and "(all grid points)" in final[0]
    assert final[1].split() == ["trial", "fold", "lam", "seed", "state", "epoch", "loss", "val_auc", "test_auc@best"]
    assert final[2].split()[:5] == ["aem_trial_00000", "0", "0.1", "0", "finished"] and final[3].split()[1] == "1"


def test_tune_metrics_nest_members_so_tune_logs_scalars():
    """A population's per-member history is no list in Tune's metrics: nested dicts, which Tune's loggers
    flatten to scalars (members/1/val/auc), and the callback reads back per member."""
    from ray.tune.utils import flatten_dict

    from aem_dist.observe.callbacks import member_results

    flat = result(0) | {"members": [result(0) | {"val/auc": 0.5 + k / 10} for k in range(3)]}
    metrics = tune_metrics(flat)
    assert isinstance(metrics["members"], dict) and list(metrics["members"]) == ["0", "1", "2"]
    logged = flatten_dict(metrics, delimiter="/")
    assert logged["members/1/val/auc"] == 0.6 and not any(isinstance(v, list) and v and isinstance(v[0], dict) for v in logged.values())
    assert [m["val/auc"] for m in member_results(metrics)] == [0.5, 0.6, 0.7]
    assert member_results(result(0)) == [result(0)]
