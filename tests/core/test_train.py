import json
import subprocess
import sys

import pytest

from aem_dist.config import load_config
from aem_dist.engine.local import run_local
from aem_dist.engine.loop import fit


def metrics_only(history):
    """History without wall-clock fields (timings differ run to run; metrics must not)."""
    return [{k: v for k, v in row.items() if k != "time"} | {"train": {k: v for k, v in row["train"].items() if k != "data_wait_s"}} for row in history]


def _cfg(demo_data, *overrides):
    return load_config("demo", [f"data.root={demo_data}", "train.progress=false", *overrides])


def test_training_on_demo_learns(demo_data):
    result = fit(_cfg(demo_data))
    assert result.test["auc"] >= 0.85, result.test  # chance is 0.5; a broken model or loss stays near it
    assert result.history[-1]["train"]["ce"] < result.history[0]["train"]["ce"]
    assert 0 <= result.best_epoch < len(result.history)


def test_aem_raises_attention_entropy(demo_data):
    plain = fit(_cfg(demo_data, "loss.lam=0"))
    aem = fit(_cfg(demo_data, "loss.lam=0.5"))
    assert aem.history[-1]["test"]["attn_entropy"] > plain.history[-1]["test"]["attn_entropy"]


def test_same_seed_same_metrics_different_seed_differs(demo_data):
    a = fit(_cfg(demo_data, "train.epochs=3", "train.seed=1"))
    b = fit(_cfg(demo_data, "train.epochs=3", "train.seed=1"))
    c = fit(_cfg(demo_data, "train.epochs=3", "train.seed=2"))
    assert metrics_only(a.history) == metrics_only(b.history)
    assert metrics_only(a.history) != metrics_only(c.history)


def test_resume_equals_uninterrupted(demo_data, tmp_path):
    overrides = ("train.epochs=4", "loss.lam=0.1", "data.subsample_ratio=0.7", "model.dropout=0.2")
    full = fit(_cfg(demo_data, *overrides))
    with pytest.raises(RuntimeError, match="injected failure after epoch 1"):
        run_local(_cfg(demo_data, *overrides, "debug.fail_at_epoch=1"), run_dir=str(tmp_path))
    epochs_seen = []
    resumed = run_local(_cfg(demo_data, *overrides), run_dir=str(tmp_path), on_epoch=lambda r: epochs_seen.append(r.epoch))
    assert epochs_seen == [2, 3]  # resumed after the checkpointed epoch 1, not from scratch
    assert metrics_only(resumed.history) == metrics_only(full.history)
    assert (resumed.best_epoch, resumed.test) == (full.best_epoch, full.test)
    assert (tmp_path / "best" / "state.pt").exists()


def test_cli_train_writes_results(demo_data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "aem_dist", "train", "--config", "demo", "--set", f"data.root={demo_data}", "--set", "train.epochs=3", "--set", "scaling.num_workers=0", "--set", "metrics.port=0", "--set", "metrics.grace_s=0", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "best epoch" in proc.stdout and "metrics: http://127.0.0.1:" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert {"best_epoch", "val", "test", "history", "config"} <= set(results)
    for split in ("val", "test"):
        assert {"auc", "f1", "acc", "balanced_acc", "attn_entropy", "attn_entropy_norm", "attn_top1pct"} <= set(results[split])
    assert len(results["history"]) == 3
    assert results["config"]["train"]["epochs"] == 3
    run = json.loads((out / "run.json").read_text())
    assert run["dataset"]["manifest_sha256"] and run["versions"]["torch"]


def test_cli_reports_config_errors_clearly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "aem_dist", "train", "--config", "demo", "--set", "loss.lamda=1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "loss.lamda" in proc.stderr and "Traceback" not in proc.stderr
