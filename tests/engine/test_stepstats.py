"""The sync-free training step: device-side statistics, the deferred NaN check, device placement."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from aem_dist.config import load_config
from aem_dist.data.devicecache import DeviceCachedLoader, PinnedLoader, place_on_device
from aem_dist.data.packing import subsample
from aem_dist.engine import loop
from aem_dist.engine.checkpoint import load_dir
from aem_dist.engine.dist import DistContext
from aem_dist.engine.local import run_local
from aem_dist.engine.loop import CosineToZero, make_optimizer, open_data, seed_epoch, train_epoch
from aem_dist.engine.stepstats import NonFiniteLossError, StepStats
from aem_dist.losses import attention_regulariser, total_loss
from aem_dist.models import build_model


def _cfg(demo_data, *overrides):
    return load_config("demo", [f"data.root={demo_data}", "train.progress=false", *overrides])


def _setup(cfg):
    ctx = DistContext()
    data = open_data(cfg, ctx)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data.manifest.dim, data.manifest.n_classes)
    opt = make_optimizer(model, cfg, ctx.device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, CosineToZero(3 * data.train.steps(0)))
    return ctx, data, model, opt, sched


def legacy_train_epoch(model, opt, sched, loader, cfg, ctx, epoch):
    """The step as it was before the sync-free accumulation: a host float per term per step."""
    model.train()
    sums: dict[str, float] = {"loss": 0.0}
    counts = {"steps": 0.0, "bags": 0.0, "instances": 0.0}
    gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + epoch * 131 + ctx.rank)
    for batch in loader.epoch(epoch):
        batch = subsample(batch, cfg.data.subsample_ratio, gen)
        out = model(batch.feats, batch.bag_index, batch.n_bags)
        terms = model.loss_terms(out, batch.labels)
        terms["aem"] = attention_regulariser(out, batch.n_bags, cfg.loss.kind)
        loss = total_loss(terms, cfg.loss.lam)
        assert bool(torch.isfinite(loss))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for name, value in {"loss": loss, **terms}.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        counts["steps"] += 1
        counts["bags"] += batch.n_bags
        counts["instances"] += batch.n_instances
    return {k: v / counts["steps"] for k, v in sums.items()} | counts


@pytest.mark.parametrize("log_every", [0, 5])
def test_sync_free_step_gives_todays_metrics(demo_data, log_every):
    cfg = _cfg(demo_data, "data.subsample_ratio=0.8", f"train.log_every={log_every}")
    ctx, data, new_model, new_opt, new_sched = _setup(cfg)
    _, _, old_model, old_opt, old_sched = _setup(cfg)
    for epoch in range(3):
        seed_epoch(cfg.train.seed, epoch, 0)
        (new,), _ = train_epoch(loop.Single(cfg, new_model, ctx, new_opt), new_sched, data.train, cfg, ctx, epoch)
        seed_epoch(cfg.train.seed, epoch, 0)
        old = legacy_train_epoch(old_model, old_opt, old_sched, data.train, cfg, ctx, epoch)
        assert set(new) == set(old) | {"data_wait_s"}
        for key, value in old.items():
            assert new[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    for a, b in zip(new_model.parameters(), old_model.parameters()):
        assert torch.equal(a, b)  # the update itself is unchanged, bit for bit


def test_stepstats_population_vectors_and_scalars():
    """Loss and terms of shape (K,) next to scalar terms: means per member, broadcast scalars."""
    stats = StepStats("cpu", log_every=2)
    rows = [(torch.tensor([1.0, 2.0, 3.0]), torch.tensor(0.5)), (torch.tensor([3.0, 4.0, 5.0]), torch.tensor(1.5)), (torch.tensor([2.0, 0.0, 1.0]), torch.tensor(1.0))]
    for i, (loss, shared) in enumerate(rows):
        stats.add(loss, {"ce": loss * 2, "aem": shared}, n_bags=4, n_instances=10 + i, keys=[f"b{i}"])
        if stats.due():
            stats.check(DistContext(), 0)
    out = stats.finish(DistContext(), 0, extra={"data_wait_s": 0.25})
    assert out["loss"] == pytest.approx([2.0, 2.0, 3.0])
    assert out["ce"] == pytest.approx([4.0, 4.0, 6.0])
    assert out["aem"] == pytest.approx([1.0, 1.0, 1.0])
    assert (out["steps"], out["bags"], out["instances"], out["data_wait_s"]) == (3, 12, 33, 0.25)


def test_stepstats_names_the_bad_member_and_step():
    stats = StepStats("cpu", log_every=0)
    stats.add(torch.tensor([1.0, 1.0]), {"ce": torch.tensor([1.0, 1.0])}, 1, 3, ["ok"])
    stats.add(torch.tensor([1.0, math.nan]), {"ce": torch.tensor([1.0, 1.0])}, 1, 3, ["slide_7", "slide_9"])
    stats.add(torch.tensor([math.inf, math.nan]), {"ce": torch.tensor([1.0, 1.0])}, 1, 3, ["later"])
    with pytest.raises(NonFiniteLossError, match=r"epoch 4: non-finite loss — rank 0 step 1 \(member 1\): bags \[slide_7, slide_9\]"):
        stats.finish(DistContext(), 4)


def test_stepstats_window_flush_keeps_sums_exact():
    stats = StepStats("cpu", log_every=0)
    stats.window = 3  # force several buffer flushes within the epoch
    values = [0.1 * i for i in range(10)]
    for v in values:
        stats.add(torch.tensor(v), {"ce": torch.tensor(2 * v)}, 1, 1)
    out = stats.finish(DistContext(), 0)
    assert out["loss"] == pytest.approx(sum(values) / 10, rel=1e-6)
    assert out["ce"] == pytest.approx(2 * sum(values) / 10, rel=1e-6)


def test_nan_at_step_k_stops_with_clear_error_and_checkpoints_stay_finite(demo_data, tmp_path, monkeypatch):
    log_every, steps_per_epoch, poison_at = 4, 12, 2 * 12 + 5  # epoch 2, step 5
    calls = {"n": 0, "keys": None, "after": 0}
    real = loop.loss_step

    def poisoned_loss_step(model, core, cfg):
        step = real(model, core, cfg)

        def run(batch):
            loss, terms = step(batch)
            i = calls["n"]
            calls["n"] += 1
            if i == poison_at:
                calls["keys"] = list(batch.keys)
                return loss * math.nan, terms
            if i > poison_at:
                calls["after"] += 1
            return loss, terms

        return run

    monkeypatch.setattr(loop, "loss_step", poisoned_loss_step)
    cfg = _cfg(demo_data, "train.epochs=4", f"train.log_every={log_every}")
    assert open_data(cfg, DistContext()).train.steps(2) == steps_per_epoch
    with pytest.raises(NonFiniteLossError) as err:
        run_local(cfg, run_dir=str(tmp_path))
    message = str(err.value)
    assert message.startswith("epoch 2: non-finite loss — rank 0 step 5: bags [")
    assert all(k in message for k in calls["keys"][:8])
    assert calls["after"] < log_every  # caught at most log_every steps late
    saved = sorted(p.parent.name for p in (tmp_path / "checkpoints").glob("*/state.pt"))
    assert saved == ["epoch-000000", "epoch-000001"]  # the poisoned epoch 2 never reached storage
    for folder in [tmp_path / "best", *(tmp_path / "checkpoints" / s for s in saved)]:
        state = load_dir(str(folder))
        assert all(torch.isfinite(t).all() for t in state["model"].values()), folder


def test_device_cache_on_cpu_is_a_noop_that_says_so(demo_data, caplog):
    cfg = _cfg(demo_data, "data.device_cache=on")
    with caplog.at_level(logging.INFO, logger="aem_dist.data.devicecache"):
        data = open_data(cfg, DistContext())
    assert type(data.train).__name__ == "InMemoryLoader"
    assert "data.device_cache=on: no-op for split 'train' on cpu" in caplog.text
    with pytest.raises(ValueError, match="data.device_cache 'always'"):
        place_on_device(data.train, "always", torch.device("cpu"))


def test_device_side_loaders_yield_the_memory_loaders_batches(demo_data):
    """The GPU loaders' packing (cached split, pinned prefetch) run on CPU and give identical batches."""
    cfg = _cfg(demo_data, "train.max_bags_per_batch=5")
    train = open_data(cfg, DistContext()).train
    for wrapped in (DeviceCachedLoader(train, torch.device("cpu")), PinnedLoader(train, torch.device("cpu"))):
        assert wrapped.steps(1) == train.steps(1) and wrapped.n_bags == train.n_bags
        got, want = list(wrapped.epoch(1)), list(train.epoch(1))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.keys == w.keys and g.feats.dtype == torch.float32
            for name in ("feats", "bag_index", "offsets", "labels"):
                assert torch.equal(getattr(g, name), getattr(w, name)), name
            gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
            assert torch.equal(subsample(g, 0.5, gen_a).feats, subsample(w, 0.5, gen_b).feats)
