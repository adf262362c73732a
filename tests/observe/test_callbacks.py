"""Ray callbacks: the Tune callback driven through its hooks with real Trial objects; the Train bridge
under a real 2-worker TorchTrainer on a private local Ray."""

from __future__ import annotations

import io

import pytest
import ray.cloudpickle as cloudpickle
from ray.tune.experiment import Trial

from aem_dist.config import MetricsSection, load_config
from aem_dist.observe.callbacks import TuneMetricsCallback, config_value, trial_labels
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
    base = load_config("demo", ["run.name=sweep-x"])
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

    # the live table was printed on state changes, naming every trial with its λ, seed and state
    text = out.getvalue()
    last = text.strip().split("[sweep-x]")[-1]
    assert "4 trials: 1 pending, 1 running, 1 terminated, 1 error" in last
    for line in ("aem_trial_00000  0    0     terminated  1      0.6000  0.8000   0.7500", "aem_trial_00002  0.1  0     error"):
        assert line in last, last
    assert text.count("[sweep-x]") >= 5


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
    cb.on_trial_result(iteration=1, trials=[trial], trial=trial, result=result(0) | {"members": per_member})
    assert cb.counts()["running"] == 3
    for k, m in enumerate(members):
        labels = {"run": "fused", "trial": m["name"], "lam": format(m["values"]["loss.lam"], "g"), "seed": "0", "model": "abmil"}
        assert sample(exporter, "aem_eval_auc", **labels, split="test") == pytest.approx(0.6 + 0.1 * k)
    table = cb.table()
    assert all(m["name"] in table for m in members) and "3 trials" in table
