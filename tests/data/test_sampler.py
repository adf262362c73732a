"""data.sampler: balanced — a class-balanced draw with replacement per training epoch, the same draw in both
loaders, whose expected gradient is the train.class_weights=balanced gradient (float64, per-bag reference)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from aem_dist.data.manifest import load_manifest
from aem_dist.data.packing import balanced_counts, balanced_probabilities, plan_rank
from aem_dist.data.streamplan import plan_epoch
from aem_dist.losses import attention_regulariser, class_weights
from tests.models.test_contract import IN_DIM, make_model

LABELS = [0] * 9 + [1] * 3  # 75 / 25


def test_probabilities_make_every_class_equally_likely_and_equal_the_balanced_weights():
    p = balanced_probabilities(LABELS)
    assert p.sum() == pytest.approx(1.0) and p[LABELS.index(1)] == pytest.approx(3 * p[0])
    per_class = [p[np.asarray(LABELS) == c].sum() for c in (0, 1)]
    assert per_class == pytest.approx([0.5, 0.5])
    w = class_weights("balanced", [LABELS.count(0), LABELS.count(1)])
    np.testing.assert_allclose(len(LABELS) * p, [w[y] for y in LABELS], rtol=1e-12)


def test_expected_sampled_gradient_is_the_class_weighted_gradient():
    """Per-bag float64 reference: Σ_b p_b ∇L_b (one draw's expected gradient) = (1/n) Σ_b w_{y_b} ∇L_b."""
    model = make_model("abmil", 2)
    g = torch.Generator().manual_seed(3)
    sizes = [2, 5, 1, 7, 3, 4, 6, 2, 3, 5, 1, 4]
    grads = []
    for n, y in zip(sizes, LABELS):
        model.zero_grad(set_to_none=True)
        out = model(torch.randn(n, IN_DIM, generator=g, dtype=torch.float64), torch.zeros(n, dtype=torch.long), 1)
        (model.loss_terms(out, torch.tensor([y]))["ce"] + 0.3 * attention_regulariser(out, 1)).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    p = balanced_probabilities(LABELS)
    w = class_weights("balanced", [LABELS.count(0), LABELS.count(1)])
    expected = sum(float(pb) * gb for pb, gb in zip(p, grads))
    weighted = sum(w[y] * gb for y, gb in zip(LABELS, grads)) / len(LABELS)
    torch.testing.assert_close(expected, weighted, atol=1e-12, rtol=1e-12)


def test_draws_are_seeded_balanced_and_as_many_as_bags():
    counts = [balanced_counts(LABELS, seed=0, epoch=e) for e in range(400)]
    assert all(c.sum() == len(LABELS) for c in counts)
    np.testing.assert_array_equal(balanced_counts(LABELS, 0, 7), counts[7])
    assert not np.array_equal(counts[0], counts[1])
    drawn = Counter({c: int(sum(k[np.asarray(LABELS) == c].sum() for k in counts)) for c in (0, 1)})
    assert drawn[1] / sum(drawn.values()) == pytest.approx(0.5, abs=0.02)  # 4 800 draws: the minority class half the time


def test_memory_and_stream_plans_draw_the_same_bags_with_equal_steps_per_rank(demo_data):
    m = load_manifest(demo_data)
    split = m.splits["train"]
    bags = split.bags()
    labels = [b.label for b in bags]
    for epoch in (0, 3):
        want = Counter({b.key: int(c) for b, c in zip(bags, balanced_counts(labels, 5, epoch)) if c})
        memory = [plan_rank([b.n for b in bags], rank=r, world_size=2, max_instances=4000, max_bags=4, train=True, seed=5, epoch=epoch,
            labels=labels) for r in (0, 1)]
        stream = plan_epoch(split, world_size=2, workers=2, train=True, seed=5, epoch=epoch, max_instances=4000, max_bags=4, sampler="balanced")
        assert len(memory[0]) == len(memory[1]) and stream.steps(0) == stream.steps(1)  # the DDP equal-steps rule holds
        got_memory = Counter(bags[i].key for r in memory for batch in r for i in batch)
        got_stream = Counter(ref.key for r in range(2) for batch in stream.rank_order(r) for ref in batch)
        # padding repeats (if any) come on top of the draw; none with packed batches here
        assert got_memory == want and got_stream == want
        assert max(want.values()) > 1  # some bag was drawn twice
    plain = plan_epoch(split, world_size=1, workers=1, train=True, seed=5, epoch=0, max_instances=4000, max_bags=4)
    assert Counter(ref.key for batch in plain.rank_order(0) for ref in batch) == Counter(b.key for b in bags)  # shuffle: every bag once


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_the_training_loader_of_a_run_draws_the_balanced_sample(demo_data, loader):
    """data.sampler reaches the run's train loader (not its eval loaders) for both loaders."""
    from aem_dist.config import load_config
    from aem_dist.engine.dist import DistContext
    from aem_dist.engine.loop import fit, open_data

    cfg = load_config("demo", [f"data.root={demo_data}", "train.epochs=1", "train.progress=false", "data.sampler=balanced", f"data.loader={loader}",
        "train.max_bags_per_batch=8", "train.seed=4"])
    data = open_data(cfg, DistContext(device=torch.device("cpu")))
    bags = data.manifest.splits["train"].bags()
    want = Counter({b.key: int(c) for b, c in zip(bags, balanced_counts([b.label for b in bags], 4, 0)) if c})
    assert Counter(k for batch in data.train.epoch(0) for k in batch.keys) == want
    assert Counter(k for batch in data.val.epoch(0) for k in batch.keys) == Counter(b.key for b in data.manifest.splits["val"].bags())
    if loader == "memory":
        result = fit(cfg)
        assert result.history[0]["train"]["bags"] == len(bags) and "auc" in result.history[0]["val"]
