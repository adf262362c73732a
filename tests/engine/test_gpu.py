"""The CUDA branches: bf16 on tensor cores for every matmul, auto's choice, a deterministic repeat (marker ``gpu``)."""

from __future__ import annotations

import pytest
import torch

from aem_dist.config import load_config
from aem_dist.engine import precision
from aem_dist.engine.dist import DistContext
from aem_dist.engine.loop import fit
from aem_dist.engine.population import Members
from tests.core.test_train import metrics_only
from tests.engine.test_bf16_everywhere import Dims, MatmulDtypes, _batch, _cfgs

pytestmark = pytest.mark.gpu


def test_auto_is_bf16_on_an_ampere_or_later_gpu():
    cap = torch.cuda.get_device_capability()
    units = precision.bf16_units("cuda")
    assert bool(units) == (cap >= (8, 0))
    assert precision.resolve("auto", units) == ("bf16" if cap >= (8, 0) else "fp32")


def test_bf16_population_step_on_cuda_runs_every_matmul_in_bfloat16():
    ctx = DistContext(device=torch.device("cuda"))
    members = Members(_cfgs("train.precision=bf16"), Dims, ctx)
    batch = _batch().to(ctx.device, torch.float32)
    members.seed_epoch(0, 0)
    with MatmulDtypes() as seen:
        members.backward(batch, ctx)
    assert seen.seen and seen.dtypes() == {torch.bfloat16}
    assert members.pop.flat.grad.dtype == torch.float32 and members.pop.flat.grad.is_cuda


def test_deterministic_cuda_run_repeats_bit_for_bit(demo_data):
    cfg = load_config("demo", [f"data.root={demo_data}", "train.progress=false", "train.epochs=2", "train.deterministic=true", "train.device=cuda"])
    try:
        a, b = fit(cfg), fit(cfg)
    finally:
        precision.configure("fp32", False, torch.device("cpu"))
    assert metrics_only(a.history) == metrics_only(b.history)
