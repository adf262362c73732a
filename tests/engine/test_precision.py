"""train.precision and train.deterministic: bf16 close to fp32, AEM in float32, flags set and recorded."""

from __future__ import annotations

import os

import pytest
import torch

from aem_dist.config import ModelConfig, load_config
from aem_dist.engine import precision
from aem_dist.engine.compile import compute_loss
from aem_dist.engine.loop import fit
from aem_dist.losses import attention_regulariser
from aem_dist.models import build_model

BF16_METRIC_TOL = 0.05  # |bf16 − fp32| on val/test AUC and F1 of the demo preset (docs/gpu.md)
BF16_LOSS_RTOL = 0.01  # relative, on the per-epoch mean training loss


def test_bf16_metrics_within_tolerance_of_fp32_on_demo(demo_data):
    base = [f"data.root={demo_data}", "train.progress=false"]
    fp32 = fit(load_config("demo", base))
    bf16 = fit(load_config("demo", [*base, "train.precision=bf16"]))
    assert fp32.best_epoch is not None and bf16.best_epoch is not None
    for split in ("val", "test"):
        for key in ("auc", "f1"):
            assert abs(bf16.history[-1][split][key] - fp32.history[-1][split][key]) <= BF16_METRIC_TOL, (split, key)
    for a, b in zip(fp32.history, bf16.history):
        assert b["train"]["loss"] == pytest.approx(a["train"]["loss"], rel=BF16_LOSS_RTOL)
    assert fp32.history != bf16.history  # bf16 really ran (matmuls in bfloat16 change the numbers)


def test_bf16_forward_keeps_softmax_entropy_and_loss_in_float32():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="abmil", hidden=16), 12, 3)
    sizes = [5, 1, 9]
    feats = torch.randn(sum(sizes), 12)
    bag_index = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    labels = torch.tensor([0, 2, 1])
    with precision.autocast("bf16", torch.device("cpu")):
        raw = model(feats, bag_index, 3)
    assert raw.logits.dtype == torch.bfloat16 and raw.attn_scores.dtype == torch.bfloat16  # the matmuls ran in bf16
    assert raw.attn_log.dtype == torch.float32  # segment log-softmax upcasts
    out = precision.float32_output(raw)
    assert out.logits.dtype == torch.float32 and out.attn_scores.dtype == torch.float32
    # The AEM term is exactly Σ a log a of the float32 log-softmax: check against float64 per bag.
    aem = attention_regulariser(out, 3)
    assert aem.dtype == torch.float32
    log_a = out.attn_log.detach().double()[:, 0]
    per_bag = [float((log_a[bag_index == b].exp() * log_a[bag_index == b]).sum()) for b in range(3)]
    assert float(aem.detach()) == pytest.approx(sum(per_bag) / 3, rel=1e-6, abs=1e-7)
    loss, terms = compute_loss(model, model, feats, bag_index, 3, labels, lam=0.1, kind="neg_entropy", precision="bf16")
    assert loss.dtype == torch.float32 and all(t.dtype == torch.float32 for t in terms.values())
    assert precision.float32_output(out) is out  # already float32: nothing recast


def _restore_cublas_env_afterwards(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # records the original state for undo
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")


def test_configure_sets_and_resets_process_flags(monkeypatch):
    _restore_cublas_env_afterwards(monkeypatch)
    try:
        applied = precision.configure("tf32", True, torch.device("cuda"))  # flags only; no CUDA needed
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == precision.CUBLAS_WORKSPACE
        assert applied | {} == {"precision": "tf32", "autocast": None, "tf32_matmul": True, "deterministic": True, "cublas_workspace_config": ":4096:8"}
    finally:
        applied = precision.configure("fp32", False, torch.device("cpu"))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(ValueError, match="train.precision 'fp8'"):
        precision.configure("fp8", False, torch.device("cpu"))


def test_deterministic_cpu_run_repeats_and_is_recorded(demo_data, monkeypatch):
    _restore_cublas_env_afterwards(monkeypatch)
    from aem_dist.engine.results import run_record

    cfg = load_config("demo", [f"data.root={demo_data}", "train.progress=false", "train.epochs=2", "train.deterministic=true"])
    try:
        a, b = fit(cfg), fit(cfg)
    finally:
        precision.configure("fp32", False, torch.device("cpu"))
    strip = lambda h: [{k: v for k, v in r.items() if k != "time"} | {"train": {k: v for k, v in r["train"].items() if k != "data_wait_s"}} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    record = run_record(cfg, "train")
    assert record["numerics"]["deterministic"] is True and record["config"]["train"]["deterministic"] is True


def test_on_off_keys_accept_yaml_booleans():
    cfg = load_config(None, {"train.compile": True, "data.device_cache": False})
    assert (cfg.train.compile, cfg.data.device_cache) == ("on", "off")
