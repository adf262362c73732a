"""Subsampling (the paper's training-time augmentation): identity at r = 1, a per-bag random subset
of ⌈r·n⌉ instances otherwise, applied in training only — evaluation always sees full bags."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aem_dist.config import load_config
from aem_dist.data.manifest import load_manifest
from aem_dist.data.packing import PackedBatch, subsample
from aem_dist.engine.dist import DistContext
from aem_dist.engine.evaluate import evaluate
from aem_dist.engine.loop import fit, open_data
from aem_dist.models import build_model

SIZES = (1, 2, 3, 10, 1000)


def batch(sizes=SIZES) -> PackedBatch:
    t = sum(sizes)
    feats = torch.arange(t, dtype=torch.float64).unsqueeze(1).repeat(1, 3)  # column 0 = original row id
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(sizes), 0, out=offsets[1:])
    return PackedBatch(
        feats=feats,
        bag_index=torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)),
        offsets=offsets,
        labels=torch.arange(len(sizes)) % 2,
        keys=[f"bag{i}" for i in range(len(sizes))],
        coords=torch.stack([torch.arange(t), -torch.arange(t)], dim=1).to(torch.int32),
    )


def test_ratio_one_is_the_identity():
    b = batch()
    assert subsample(b, 1.0, torch.Generator().manual_seed(0)) is b


@pytest.mark.parametrize("ratio", [0.1, 0.33, 0.5, 0.9])
def test_kept_instances_are_a_per_bag_subset_of_the_right_size(ratio):
    b = batch()
    for seed in range(5):
        s = subsample(b, ratio, torch.Generator().manual_seed(seed))
        want = [max(1, math.ceil(ratio * n)) for n in SIZES]
        assert s.sizes().tolist() == want
        assert s.n_instances == sum(want)
        assert s.keys == b.keys and torch.equal(s.labels, b.labels)
        assert torch.equal(s.bag_index, torch.repeat_interleave(torch.arange(len(SIZES)), torch.tensor(want)))
        rows = s.feats[:, 0].long()
        assert torch.equal(s.feats, b.feats[rows]) and torch.equal(s.coords, b.coords[rows])  # rows travel whole
        for i in range(len(SIZES)):
            mine = rows[s.offsets[i] : s.offsets[i + 1]]
            lo, hi = int(b.offsets[i]), int(b.offsets[i + 1])
            assert ((mine >= lo) & (mine < hi)).all(), "kept rows must come from their own bag"
            assert (torch.diff(mine) > 0).all(), "no row twice; original order kept"


def test_every_instance_is_equally_likely_to_be_kept():
    b = batch((10, 40))
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(50)
    draws = 600
    for _ in range(draws):
        counts[subsample(b, 0.3, gen).feats[:, 0].long()] += 1
    freq = counts / draws
    np.testing.assert_allclose(freq[:10].numpy(), 0.3, atol=0.07)  # ⌈0.3·10⌉ = 3 of 10
    np.testing.assert_allclose(freq[10:].numpy(), 0.3, atol=0.07)  # 12 of 40


def test_training_subsamples_and_evaluation_sees_full_bags(demo_data):
    cfg = load_config("demo", [f"data.root={demo_data}", "data.subsample_ratio=0.3", "train.epochs=1", "train.progress=false"])
    states = []
    result = fit(cfg, on_epoch=lambda report: states.append(report.state()))
    row = result.history[0]
    train_sizes = [b.n for b in load_manifest(demo_data).split("train").bags()]
    # training saw ⌈0.3·n⌉ instances of every bag ...
    assert row["train"]["instances"] == sum(max(1, math.ceil(0.3 * n)) for n in train_sizes)
    # ... while evaluation of the trained weights on full bags reproduces the reported metrics exactly
    ctx = DistContext()
    data = open_data(cfg, ctx)
    model = build_model(cfg.model, data.manifest.dim, data.manifest.n_classes)
    model.load_state_dict(states[0]["model"])
    for split, loader in (("val", data.val), ("test", data.test)):
        full = evaluate(model, loader, ctx, data.manifest.n_classes).metrics
        for metric in ("auc", "f1", "attn_entropy", "attn_top1pct"):
            assert full[metric] == pytest.approx(row[split][metric], abs=1e-12), (split, metric)
