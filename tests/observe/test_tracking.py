"""MLflow tracking written to the embedded local store and read back with MLflow's own client."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from ray.tune.experiment import Trial

from aem_dist.config import ConfigError, load_config
from aem_dist.observe.callbacks import TuneMetricsCallback, tune_metrics
from aem_dist.observe.tracking import TAG_TRIAL, embedded_uri, tracking
from tests.conftest import require


@pytest.fixture(autouse=True)
def mlflow_installed():
    # the mlflow extra, which `make venv` installs: under CI=true a missing MLflow fails, never skips
    require(importlib.util.find_spec("mlflow") is not None, "MLflow (the mlflow extra)")


def _client(out: Path):
    from mlflow import MlflowClient

    uri, _ = embedded_uri(str(out))
    return MlflowClient(tracking_uri=uri)


def test_a_sweep_is_a_parent_run_with_one_child_per_grid_point(tmp_path):
    out = tmp_path / "sweep"
    cfg = load_config("demo", ["run.name=tracked", "train.epochs=2", "mlflow.enabled=true", "sweep.grid={loss.lam: [0.0, 0.1]}"])
    names = ["lam=0.0", "lam=0.1"]
    members = [{"name": n, "values": {"loss.lam": lam}} for n, lam in zip(names, (0.0, 0.1))]
    for name in names:  # what the trial writes before Tune completes it
        (out / "trials" / name / "best").mkdir(parents=True)
        (out / "trials" / name / "best" / "state.pt").write_bytes(b"weights")
        (out / "trials" / name / "results.json").write_text(json.dumps({"best_epoch": 1, "val": {"auc": 0.9}, "test": {"auc": 0.8, "f1": 0.7}}))
    trial = Trial("aem_trial", config={"_population": {"name": "pop", "members": members}}, trial_id="00000", stub=True)
    with tracking(cfg, str(out), "sweep", lambda n: str(out / "trials" / n)) as tracker:
        cb = TuneMetricsCallback(cfg, None, planned=names, print_table=False, tracker=tracker)
        trial.set_status(Trial.RUNNING)
        cb.on_trial_start(iteration=0, trials=[trial], trial=trial)
        for epoch in range(2):
            per_member = [{"epoch": epoch, "train/loss": 0.7 - 0.1 * epoch - k, "val/auc": 0.8 + 0.05 * epoch, "time/step_s": [0.1]} for k in range(2)]
            cb.on_trial_result(iteration=1 + epoch, trials=[trial], trial=trial, result=tune_metrics({"epoch": epoch, "members": per_member}))
        trial.set_status(Trial.TERMINATED)
        cb.on_trial_complete(iteration=3, trials=[trial], trial=trial)
        (out / "report.md").write_text("# Report\n")
        (out / "plots").mkdir()
        (out / "plots" / "training_curves.png").write_bytes(b"png")
    assert not tracker.failed

    client = _client(out)
    exp = client.get_experiment_by_name("tracked")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.data.tags[TAG_TRIAL]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(names) and parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"report.md", "plots"}
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "plots")] == ["plots/training_curves.png"]
    child = children["lam=0.1"]
    assert child.data.params["swept.loss.lam"] == "0.1" and child.data.params["loss.lam"] == "0.1" and child.data.params["train.epochs"] == "2"
    assert children["lam=0.0"].data.params["loss.lam"] == "0.0"
    history = client.get_metric_history(child.info.run_id, "train/loss")
    assert [(m.step, round(m.value, 6)) for m in sorted(history, key=lambda m: m.step)] == [(0, -0.3), (1, -0.4)]  # member 1's own values
    assert child.data.metrics["best/test/auc"] == 0.8 and child.data.metrics["best/epoch"] == 1
    assert {a.path for a in client.list_artifacts(child.info.run_id)} == {"results.json", "best"}
    assert [a.path for a in client.list_artifacts(child.info.run_id, "best")] == ["best/state.pt"]
    assert child.info.status == "FINISHED"

    # --resume: the same parent and children go on, no new runs
    with tracking(cfg, str(out), "sweep", lambda n: str(out / "trials" / n)) as again:
        again.epoch("lam=0.1", {"loss.lam": 0.1}, {"epoch": 2, "train/loss": -0.5})
    assert len(client.search_runs([exp.experiment_id])) == 3
    assert len(client.get_metric_history(child.info.run_id, "train/loss")) == 3


def test_an_in_process_train_run_is_tracked(demo_data, tmp_path):
    from aem_dist.orchestrate.train import train_run

    out = tmp_path / "run"
    cfg = load_config("demo", [f"data.root={demo_data}", "train.epochs=2", "train.progress=false", "scaling.num_workers=0", "metrics.enabled=false",
                               "mlflow.enabled=true", "mlflow.experiment=runs", "run.name=one"])  # fmt: skip
    said: list[str] = []
    results = train_run(cfg, str(out), announce=said.append)
    assert any(s.startswith("mlflow: sqlite:///") for s in said)
    client = _client(out)
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("runs").experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert run.info.run_name == "one" and run.data.params["data.root"] == demo_data
    assert len(client.get_metric_history(run.info.run_id, "val/auc")) == 2
    assert run.data.metrics["best/test/auc"] == pytest.approx(results["test"]["auc"])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "best")] == ["best/state.pt"]


def test_tracking_refuses_what_cannot_work():
    cfg = load_config("demo", ["mlflow.enabled=true"])
    with pytest.raises(ConfigError, match="mlflow.tracking_uri"):
        tracking(cfg, "s3://bucket/sweep", "sweep", str)
    with pytest.raises(ConfigError, match="credentials"):
        load_config("demo", ["mlflow.tracking_uri=https://me:secret@mlflow.example.org"])
