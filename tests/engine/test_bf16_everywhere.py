"""train.precision=bf16 governs every matmul (populations, single runs, evaluation); auto resolves by the
device's bf16 units; a model that cannot run bf16 falls back to fp32 in one line."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aem_dist.config import load_config
from aem_dist.data.folds import open_manifest
from aem_dist.data.packing import PackedBatch
from aem_dist.engine import precision
from aem_dist.engine.dist import DistContext
from aem_dist.engine.loop import Single, fit, fit_members, with_precision
from aem_dist.engine.population import Members

# Matmul-like aten ops, by overload packet name: what a Linear, @, bmm or einsum lowers to.
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "matmul", "linear", "_addmm_activation"}
# bf16 member k vs its bf16 standalone run, 2 epochs of the demo preset (docs/gpu.md): the population's
# shared input product and batched per-member matmuls round like the standalone's Linear layers up to
# kernel blocking, so a few bf16 ulps differ; this bounds where that leaves losses and metrics.
BF16_MEMBER_RTOL = 1e-3  # per-epoch training loss terms, relative (measured: ≤ 9e-5)
BF16_MEMBER_METRIC_TOL = 0.05  # val/test AUC and F1, absolute (measured: ≤ 0.021, one test bag)


class MatmulDtypes(TorchDispatchMode):
    """Records the input dtypes of every matmul-like op dispatched inside the block (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in MATMULS:
            self.seen.append((func.overloadpacket.__name__, tuple(a.dtype for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))

    def dtypes(self) -> set[torch.dtype]:
        return {d for _, ds in self.seen for d in ds}


class Dims:  # what Members reads from a manifest
    dim, n_classes = 12, 3


def _batch(sizes=(5, 1, 9), dim=12) -> PackedBatch:
    torch.manual_seed(0)
    bag_index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    return PackedBatch(torch.randn(sum(sizes), dim), bag_index, offsets, torch.tensor([0, 2, 1]), [f"b{i}" for i in range(len(sizes))])


def _cfgs(*extra, k=3):
    return [load_config("demo", ["model.hidden=16", "train.data_seed=0", f"train.seed={i}", f"loss.lam={0.1 * i}", *extra]) for i in range(k)]


def _step_dtypes(trainee, batch) -> MatmulDtypes:
    trainee.seed_epoch(0, 0)
    with MatmulDtypes() as seen:
        loss, _ = trainee.loss(batch)
        loss.sum().backward()
    return seen


@pytest.mark.parametrize("vectorised", [True, False], ids=["vmap", "member-by-member"])
@pytest.mark.parametrize("bias", [False, True])
def test_every_matmul_of_a_bf16_population_step_runs_in_bfloat16(vectorised, bias):
    """The shared input product, every member's layers (vmap or loop), forward and backward, and predict."""
    members = Members(_cfgs("train.precision=bf16", f"model.bias={str(bias).lower()}"), Dims, DistContext())
    members.pop.vectorised = vectorised
    batch = _batch()
    seen = _step_dtypes(members, batch)
    assert len(seen.seen) >= 6 and seen.dtypes() == {torch.bfloat16}, seen.seen
    assert members.pop.flat.grad.dtype == torch.float32 and members.pop.flat.dtype == torch.float32  # fp32 master weights
    members.optimizer.step()
    assert all(v.dtype == torch.float32 for s in members.optimizer.state.values() for k, v in s.items() if k != "step")
    with MatmulDtypes() as pred:
        logits, attn = members.pop.predict(batch.feats, batch.bag_index, batch.n_bags)
    assert pred.seen and pred.dtypes() == {torch.bfloat16}, pred.seen
    assert logits.dtype == torch.float32 and attn.dtype == torch.float32


def test_fp32_population_step_has_no_bfloat16_matmul():
    """The counter sees the same matmuls in fp32 (so the bf16 test above cannot pass by seeing none)."""
    members = Members(_cfgs(), Dims, DistContext())
    seen = _step_dtypes(members, _batch())
    assert len(seen.seen) >= 6 and seen.dtypes() == {torch.float32}


def test_bf16_single_run_step_and_evaluation_run_every_matmul_in_bfloat16(demo_data):
    cfg = load_config("demo", [f"data.root={demo_data}", "train.precision=bf16"])
    trainee = Single.build(cfg, Dims.dim, Dims.n_classes, DistContext())
    seen = _step_dtypes(trainee, _batch())
    assert seen.seen and seen.dtypes() == {torch.bfloat16}, seen.seen

    class OneBatch:  # what predict reads from a loader
        def epoch(self, epoch):
            return iter([_batch()])

    with MatmulDtypes() as pred:
        rows = trainee.predict(OneBatch(), DistContext(), 0)[0]
    assert pred.seen and pred.dtypes() == {torch.bfloat16}
    assert len(rows) == 3 and all(abs(r.probs.sum() - 1) < 1e-6 for r in rows)


def test_bf16_population_member_equals_its_bf16_standalone_run(demo_data):
    base = [f"data.root={demo_data}", "train.progress=false", "train.epochs=2", "train.precision=bf16", "train.max_bags_per_batch=4"]
    cfgs = _cfgs(*base)
    fused = fit_members(cfgs)
    for k, cfg in enumerate(cfgs):
        alone = fit(cfg)
        for a, b in zip(fused[k].history, alone.history):
            for key in ("loss", "ce", "aem"):
                assert a["train"][key] == pytest.approx(b["train"][key], rel=BF16_MEMBER_RTOL, abs=1e-3), (k, a["epoch"], key)
            for split in ("val", "test"):
                for key in ("auc", "f1"):
                    assert abs(a[split][key] - b[split][key]) <= BF16_MEMBER_METRIC_TOL, (k, a["epoch"], split, key)


def test_auto_resolves_by_the_bf16_units_of_the_device():
    assert precision.bf16_units("cpu", flags={"fpu", "avx512f", "avx512_bf16"}) == ["avx512_bf16"]
    assert precision.bf16_units("cpu", flags={"amx_bf16", "amx_tile", "avx512_bf16"}) == ["amx_bf16", "avx512_bf16"]
    assert precision.bf16_units("cpu", flags={"fpu", "avx2", "avx512f"}) == []  # no bf16 matrix units
    assert precision.bf16_units("cuda", capability=(7, 5)) == []  # Turing: fp16 tensor cores only
    assert precision.bf16_units("cuda", capability=(8, 0)) and precision.bf16_units("cuda", capability=(9, 0))
    assert precision.bf16_units("mps") == []
    assert precision.resolve("auto", ["avx512_bf16"]) == "bf16" and precision.resolve("auto", []) == "fp32"
    assert precision.resolve("fp32", ["amx_bf16"]) == "fp32" and precision.resolve("bf16", []) == "bf16"  # explicit choices stand
    with pytest.raises(ValueError, match="train.precision 'fp8'"):
        precision.resolve("fp8", [])
    # this machine, as its kernel reports it
    here = precision.cpu_flags()
    expect = "bf16" if here & set(precision.BF16_CPU_FLAGS) else "fp32"
    assert precision.resolve("auto", precision.bf16_units("cpu")) == expect
    assert precision.cpu_flags("/nonexistent/cpuinfo") == set()


def test_auto_is_recorded_in_run_json_numerics(demo_data):
    from aem_dist.engine.results import run_record

    record = run_record(load_config("demo", [f"data.root={demo_data}", "train.precision=auto", "train.device=cpu"]), "train")
    units = precision.bf16_units("cpu")
    assert record["numerics"]["precision"] == "auto" and record["numerics"]["bf16_units"] == units
    assert record["numerics"]["precision_used"] == ("bf16" if units else "fp32")


def test_a_model_that_cannot_run_bf16_says_so_once_and_runs_fp32(demo_data, caplog):
    """ACMIL's masking writes float32 into a bfloat16 tensor under autocast (index_put): fp32, one warning."""
    cfg = load_config("demo", [f"data.root={demo_data}", "model.name=acmil", "train.precision=bf16"])
    with caplog.at_level(logging.INFO, logger="aem_dist.engine.loop"):
        used = with_precision([cfg], open_manifest(cfg.data), DistContext())
    assert used[0].train.precision == "fp32" and cfg.train.precision == "bf16"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "model.name=acmil cannot run in bfloat16" in warnings[0].getMessage()
    assert "'requested': 'bf16'" in caplog.text  # the numerics line names what was asked for
    abmil = with_precision([load_config("demo", [f"data.root={demo_data}", "train.precision=bf16"])], open_manifest(cfg.data), DistContext())
    assert abmil[0].train.precision == "bf16"
