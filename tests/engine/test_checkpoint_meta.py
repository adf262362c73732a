"""A checkpoint's model_meta is checked against the data limits and against the tensors the checkpoint
holds before any model is allocated from it (before: hidden = 1e6 made `predict` try for 4 TB)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from aem_dist.config import model_options
from aem_dist.engine.checkpoint import save_dir
from aem_dist.engine.inference import model_from_state
from aem_dist.models import build_model
from aem_dist.models.registry import MODELS


def state_of(name: str, dim: int = 8) -> dict:
    opts = model_options(name)(name=name)
    model = build_model(opts, dim, 2)
    return {"model": model.state_dict(), "model_meta": {"name": name, "dim": dim, "n_classes": 2, "model": opts.model_dump()}, "epoch": 0}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_rebuilds_from_its_checkpoint(name):
    state = state_of(name)
    model = model_from_state(state)
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, state["model"][k]), k


def test_a_huge_model_meta_is_refused_before_allocating(tmp_path):
    state = state_of("abmil")
    state["model_meta"]["model"]["hidden"] = 1_000_000  # 4 TB of weights for a realistic dim, described in a kilobyte
    state["model_meta"]["dim"] = 1_000_000
    with pytest.raises(ValueError, match="model_meta is not a model this checkpoint can hold .*feature dim 1,000,000, above data.max_dim"):
        model_from_state(state, "run/best/state.pt")
    state["model_meta"]["dim"] = 8
    with pytest.raises(ValueError, match=r"run/best/state.pt: model_meta describes .* tensors that the checkpoint does not hold as described"):
        model_from_state(state, "run/best/state.pt")
    state["model_meta"]["n_classes"] = 10**9
    with pytest.raises(ValueError, match="1,000,000,000 classes"):
        model_from_state(state)


def test_predict_with_a_huge_model_meta_is_one_line(tmp_path):
    state = state_of("abmil")
    state["model_meta"]["model"]["hidden"] = 1_000_000
    save_dir(state, str(tmp_path / "run" / "best"))
    proc = subprocess.run([sys.executable, "-m", "aem_dist", "predict", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "p.zarr"), "--data",
                           str(tmp_path / "none")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "model_meta describes" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
