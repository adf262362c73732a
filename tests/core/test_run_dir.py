"""A run folder belongs to one config: a resume with a result-relevant change is refused by name."""

import json

import pytest

from aem_dist.config import ConfigError, load_config, resolve_config_path
from aem_dist.engine.local import run_local
from aem_dist.engine.runrecord import RunConfigMismatch, result_relevant_diff
from aem_dist.orchestrate.train import train_run


def _cfg(demo_data, *overrides):
    return load_config("demo", [f"data.root={demo_data}", "train.progress=false", "train.epochs=2", "metrics.enabled=false", "scaling.num_workers=0", *overrides])


def test_resume_with_a_changed_lambda_is_refused_naming_the_key(demo_data, tmp_path):
    run_local(_cfg(demo_data, "loss.lam=0.1"), run_dir=str(tmp_path))
    with pytest.raises(RunConfigMismatch, match=r"loss\.lam 0\.1 → 0\.5") as err:
        run_local(_cfg(demo_data, "loss.lam=0.5"), run_dir=str(tmp_path))
    assert "\n" not in str(err.value) and "--force-new" in str(err.value)


def test_raised_epochs_on_a_finished_run_is_refused_not_trained_at_lr_0(demo_data, tmp_path):
    train_run(_cfg(demo_data), str(tmp_path))
    with pytest.raises(RunConfigMismatch, match=r"train\.epochs 2 → 4.*lr schedule"):
        train_run(_cfg(demo_data, "train.epochs=4"), str(tmp_path))


def test_force_new_starts_over_and_results_record_the_config_that_trained(demo_data, tmp_path):
    train_run(_cfg(demo_data, "loss.lam=0.1"), str(tmp_path))
    seen = []
    results = train_run(_cfg(demo_data, "loss.lam=0.5"), str(tmp_path), force_new=True)
    assert results["resumed_after_epoch"] is None and len(results["history"]) == 2
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["config"]["loss"]["lam"] == 0.5
    # the same config again resumes (nothing left to train), and settings that do not change the
    # numbers may differ
    again = run_local(_cfg(demo_data, "loss.lam=0.5", "data.num_workers=1", "debug.fail_at_epoch=7"), run_dir=str(tmp_path), on_epoch=seen.append)
    assert seen == [] and again.resumed_after == 1


def test_result_relevant_diff():
    a = load_config(None, []).to_dict()
    b = load_config(None, ["loss.lam=0.2", "train.progress=false", "metrics.port=1", "scaling.num_workers=1", "model.hidden=64"]).to_dict()
    assert result_relevant_diff(a, b) == ["loss.lam", "model.hidden"]  # num_workers 0 and 1 are one rank
    c = load_config(None, ["scaling.num_workers=2"]).to_dict()
    assert result_relevant_diff(a, c) == ["scaling.num_workers"]


def test_config_with_a_missing_path_errors_instead_of_loading_the_packaged_file(tmp_path):
    with pytest.raises(ConfigError, match="not found.*--config camelyon16"):
        resolve_config_path(tmp_path / "wrong" / "camelyon16.yaml")
    with pytest.raises(ConfigError, match="not found"):
        resolve_config_path("camelyon16.yaml")  # a file name, not the packaged name
    assert resolve_config_path("camelyon16").name == "camelyon16.yaml"
    with pytest.raises(ConfigError, match="not found"):
        resolve_config_path(tmp_path / "configs" / "camelyon16.yaml")  # absolute: never the packaged file


def test_cli_refuses_a_changed_config_in_one_line_and_force_new_starts_over(demo_data, tmp_path):
    import subprocess
    import sys

    def train(*extra):
        args = ["--set", f"data.root={demo_data}", "--set", "train.epochs=1", "--set", "scaling.num_workers=0", "--set", "metrics.enabled=false", "--set", "train.progress=false"]
        return subprocess.run([sys.executable, "-m", "aem_dist", "train", "--config", "demo", *args, "--out", str(tmp_path), *extra], capture_output=True, text=True, timeout=300)

    assert train("--set", "loss.lam=0.1").returncode == 0
    refused = train("--set", "loss.lam=0.2")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    line = next(ln for ln in refused.stderr.splitlines() if ln.startswith("error:"))
    assert "loss.lam 0.1 → 0.2" in line and "--force-new" in line
    assert train("--set", "loss.lam=0.2", "--force-new").returncode == 0
    assert json.loads((tmp_path / "results.json").read_text())["config"]["loss"]["lam"] == 0.2
