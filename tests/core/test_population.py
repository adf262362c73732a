"""Populations: K members trained as one stacked model equal K standalone runs (float64, 1e-5)."""

from __future__ import annotations

import math

import pytest
import torch

from aem_dist.config import ConfigError, load_config
from aem_dist.engine.checkpoint import state_from_bytes, state_to_bytes
from aem_dist.engine.loop import fit, fit_members
from aem_dist.engine.population import Members, Population, StackedAdamW, check_fusable, clip_member_grads_
from aem_dist.models import MODELS, build_model
from aem_dist.orchestrate.plan import SweepPlan
from tests.core.test_train import metrics_only

# Members differ in every key that may differ: λ, init seed, lr, weight decay and the regulariser.
MEMBERS = [
    {"loss.lam": 0.0, "train.seed": 0, "train.lr": 1e-3, "train.weight_decay": 1e-4},
    {"loss.lam": 0.1, "train.seed": 1, "train.lr": 5e-4, "train.weight_decay": 1e-2},
    {"loss.lam": 0.5, "train.seed": 2, "train.lr": 2e-3, "train.weight_decay": 0.0, "loss.kind": "kl_uniform"},
]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """A quarter of the demo preset: enough bags for val/test metrics, fast enough for every model."""
    from aem_dist.data.synthetic import get_spec, write_synthetic

    root = str(tmp_path_factory.mktemp("small-demo"))
    write_synthetic(get_spec("demo", scale=0.25), root, seed=0, progress=False)
    return root


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _cfgs(root, model="abmil", members=MEMBERS, *extra):
    base = [f"data.root={root}", "train.progress=false", "train.epochs=2", f"model.name={model}", "model.hidden=16", "train.data_seed=0", "train.max_bags_per_batch=4", *extra]
    return [load_config("demo", base + [f"{k}={v}" for k, v in m.items()]) for m in members]


def _assert_same_history(got, want, tol=1e-5):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        for split in ("train", "val", "test"):
            for key, value in b[split].items():
                if key == "data_wait_s" or value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                assert a[split][key] == pytest.approx(value, abs=tol, rel=tol), (a["epoch"], split, key)


FUSING = sorted(name for name, cls in MODELS.items() if cls.population_note is None)


def test_which_models_fuse():
    # the rest say why in one line, and sweeps run them one trial per grid point
    assert sorted(set(MODELS) - set(FUSING)) == ["c2c", "ibmil", "mhim"]
    assert all(MODELS[n].population_note for n in ("c2c", "ibmil", "mhim"))
    cfgs = [load_config("demo", ["model.name=mhim", "train.data_seed=0", f"train.seed={s}"]) for s in (0, 1)]
    with pytest.raises(ValueError, match="cannot train as a population: its EMA teacher"):
        Members(cfgs, None, None)


@pytest.mark.parametrize("model", FUSING)
def test_member_equals_standalone_run(small_data, float64, model):
    """Every epoch's train/val/test metrics and the final weights of member k equal the standalone run
    of member k's config; for models whose forward vectorises and for those run member by member."""
    cfgs = _cfgs(small_data, model)
    captured = {}
    pop = fit_members(cfgs, on_epoch=lambda r: captured.update(state=r.state, member=r.member_state))
    final = captured["state"]()
    for k, cfg in enumerate(cfgs):
        solo_state = {}
        solo = fit(cfg, on_epoch=lambda r: solo_state.update(state=r.state))
        _assert_same_history(pop[k].history, solo.history)
        assert pop[k].best_epoch == solo.best_epoch
        mine = captured["member"](k)["model"]
        for name, value in solo_state["state"]()["model"].items():
            torch.testing.assert_close(mine[name], value, atol=1e-5, rtol=1e-5, msg=f"{model} member {k} {name}")
    assert final["population"]["flat"].shape[0] == len(cfgs)


def test_one_member_population_is_todays_engine(small_data):
    cfg = _cfgs(small_data)[1]
    # the same code path (Single: a plain module and torch's AdamW), so equal bit for bit
    assert metrics_only(fit_members([cfg])[0].history) == metrics_only(fit(cfg).history)


def test_population_resume_equals_uninterrupted(small_data, float64):
    cfgs = _cfgs(small_data, "acmil", MEMBERS[:2], "train.epochs=3")  # acmil: per-member RNG streams
    states = {}
    whole = fit_members(cfgs, on_epoch=lambda r: states.setdefault(r.epoch, state_to_bytes(r.state())))
    resumed = fit_members(cfgs, resume=state_from_bytes(states[0]))  # what a checkpoint holds, read safely
    for a, b in zip(resumed, whole):
        assert a.resumed_after == 0
        _assert_same_history(a.history, b.history, tol=1e-12)


def test_stacked_adamw_equals_torch_adamw_per_member():
    torch.manual_seed(0)
    K, lrs, wds = 3, [1e-3, 3e-2, 5e-4], [0.0, 1e-2, 0.5]
    flat = torch.nn.Parameter(torch.randn(K, 7, 5, dtype=torch.float64))
    solo = [torch.nn.Parameter(flat.detach()[k].clone()) for k in range(K)]
    opt = StackedAdamW([flat], torch.tensor(lrs, dtype=torch.float64), torch.tensor(wds, dtype=torch.float64))
    refs = [torch.optim.AdamW([p], lr=lr, weight_decay=wd) for p, lr, wd in zip(solo, lrs, wds)]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)  # the multiplier drives every member
    ref_scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5**s) for o in refs]
    for _ in range(6):
        g = torch.randn(K, 7, 5, dtype=torch.float64)
        flat.grad = g.clone()
        for k, p in enumerate(solo):
            p.grad = g[k].clone()
        opt.step()
        sched.step()
        for o, s in zip(refs, ref_scheds):
            o.step()
            s.step()
    for k in range(K):
        torch.testing.assert_close(flat.detach()[k], solo[k].detach(), atol=1e-12, rtol=1e-12)


def test_clipping_is_per_member():
    torch.manual_seed(1)
    grads = [torch.randn(4, 3, dtype=torch.float64) * s for s in (0.1, 10.0)]
    flat = torch.nn.Parameter(torch.zeros(2, 12, dtype=torch.float64))
    flat.grad = torch.stack([g.reshape(-1) for g in grads])
    clip_member_grads_(flat, 1.0)
    for k, g in enumerate(grads):
        p = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
        p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_([p], 1.0)
        torch.testing.assert_close(flat.grad[k], p.grad.reshape(-1))


def test_members_initialised_as_their_standalone_runs():
    cfg = load_config("demo")
    models = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        models.append(build_model(cfg.model, 8, 2))
    pop = Population(models, [False, False])
    for k, m in enumerate(models):
        for name, value in m.state_dict().items():
            assert torch.equal(pop.member_state_dict(k)[name], value)


def _plan(*overrides, grid):
    cfg = load_config("demo", ["data.root=/nonexistent", *overrides, f"sweep.grid={grid}"])
    return SweepPlan.build(cfg).populations  # no dataset at data.root: auto fuses up to its cap


def test_grid_points_fuse_only_when_shapes_and_data_agree():
    # seeds vary init AND data order by default: one population per seed
    specs = _plan(grid="{train.seed: [0, 1], loss.lam: [0.0, 0.1, 0.5]}")
    assert [[m.values for m in s.members] for s in specs] == [
        [{"train.seed": 0, "loss.lam": lam} for lam in (0.0, 0.1, 0.5)],
        [{"train.seed": 1, "loss.lam": lam} for lam in (0.0, 0.1, 0.5)],
    ]
    # a shared data seed fuses seeds too
    assert [len(s.members) for s in _plan("train.data_seed=0", grid="{train.seed: [0, 1], loss.lam: [0.0, 0.1, 0.5]}")] == [6]
    # shapes split populations; data seeds split populations
    assert [len(s.members) for s in _plan(grid="{model.hidden: [8, 16], loss.lam: [0.0, 0.1]}")] == [2, 2]
    assert [len(s.members) for s in _plan(grid="{train.data_seed: [0, 1], loss.lam: [0.0, 0.1]}")] == [2, 2]
    # caps and off
    assert [len(s.members) for s in _plan("sweep.population=4", "train.data_seed=0", grid="{train.seed: [0, 1, 2], loss.lam: [0.0, 0.1]}")] == [4, 2]
    assert [len(s.members) for s in _plan("sweep.population=off", grid="{loss.lam: [0.0, 0.1]}")] == [1, 1]
    names = [s.name for s in _plan(grid="{loss.lam: [0.0, 0.1]}")]
    assert names == ["pop_lam=0.0+1"]


def test_bad_population_setting_names_the_key():
    for bad in ("0", "many", "-2"):
        with pytest.raises(ConfigError, match="sweep.population"):
            load_config("demo", [f"sweep.population={bad}"])


def test_members_that_differ_elsewhere_do_not_fuse(small_data):
    cfgs = _cfgs(small_data, "abmil", MEMBERS[:1]) + _cfgs(small_data, "abmil", MEMBERS[1:2], "model.hidden=8")
    with pytest.raises(ValueError, match="model.hidden"):
        check_fusable(cfgs)
