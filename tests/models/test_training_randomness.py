"""Training-time randomness: ACMIL's stochastic top-K masking and DTFD's random pseudo-bags.

Both draw from torch's global RNG (the loop seeds it per epoch and rank) and only in training mode.
"""

from __future__ import annotations

import math

import pytest
import torch

from aem_dist.config import model_options
from aem_dist.losses import attention_regulariser
from aem_dist.models import build_model
from aem_dist.models.acmil import stkim_keep
from aem_dist.models.dtfd import pseudo_bags
from aem_dist.models.segment import segment_count

SIZES = (1, 3, 7, 10, 11, 400)


def packed(sizes=SIZES, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(sum(sizes), dim, generator=g, dtype=torch.float64)
    return feats, torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def acmil(**kw):
    torch.manual_seed(0)
    return build_model(model_options("acmil")(name="acmil", hidden=8, **kw), 5, 2).double()


def removed_pairs(out, n_instances: int, branches: int) -> set[tuple[int, int]]:
    kept = set(zip(out.attn_rows.tolist(), (out.attn_index % branches).tolist()))
    return {(i, k) for i in range(n_instances) for k in range(branches)} - kept


def test_acmil_masks_nothing_in_eval_mode():
    model = acmil().eval()
    feats, bag_index = packed()
    with torch.no_grad():
        outs = [model(feats, bag_index, len(SIZES)) for _ in range(3)]
    for out in outs:
        assert not removed_pairs(out, len(feats), 5)
        torch.testing.assert_close(out.logits, outs[0].logits, rtol=0, atol=0)


@pytest.mark.parametrize("top_k,prob", [(10, 0.6), (4, 1.0), (3, 0.5)])
def test_acmil_training_masks_only_top_k_instances(top_k, prob):
    model = acmil(mask_top_k=top_k, mask_prob=prob).train()
    feats, bag_index = packed()
    with torch.no_grad():
        scores = model.attention(model.embed(feats))  # (T, K) the branch scores masking ranks by
    draws = []
    for seed in range(8):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model(feats, bag_index, len(SIZES))
        removed = removed_pairs(out, len(feats), 5)
        draws.append(frozenset(removed))
        for b, n in enumerate(SIZES):
            rows = (bag_index == b).nonzero().squeeze(1)
            k_eff = min(top_k, n)
            expected = min(math.floor(k_eff * prob + 1e-9), n - 1)
            for k in range(5):
                top = set(rows[torch.argsort(scores[rows, k], descending=True)[:k_eff]].tolist())
                gone = {i for i, kk in removed if kk == k and i in set(rows.tolist())}
                assert gone <= top, f"bag {b} branch {k}: removed instances outside the top-{k_eff}"
                assert len(gone) == expected, f"bag {b} (n={n}) branch {k}: removed {len(gone)}, want {expected}"
        # every (bag, branch) softmax still sums to one over what is left
        a = torch.exp(out.log_attention())[:, 0]
        sums = torch.zeros(out.n_segments, dtype=a.dtype).index_add_(0, out.attn_index, a)
        torch.testing.assert_close(sums, torch.ones_like(sums))
        # AEM covers every branch, over the instances that branch kept: a naive Σ a log a
        per_bag = []
        for b in range(len(SIZES)):
            rows = set((bag_index == b).nonzero().squeeze(1).tolist())
            per_branch = []
            for k in range(5):
                kept = sorted(i for i in rows if (i, k) not in removed)
                p = torch.softmax(scores[kept, k], dim=0).tolist()
                per_branch.append(sum(v * math.log(v) for v in p))
            per_bag.append(sum(per_branch) / 5)
        assert float(attention_regulariser(out, len(SIZES))) == pytest.approx(sum(per_bag) / len(SIZES), abs=1e-9)
    assert len(set(draws)) > 1, "masking should be random across seeds"
    # the same global seed gives the same mask
    torch.manual_seed(3)
    again = removed_pairs(model(feats, bag_index, len(SIZES)), len(feats), 5)
    assert frozenset(again) == draws[3]


def test_acmil_mask_prob_zero_masks_nothing_in_training():
    model = acmil(mask_prob=0.0).train()
    feats, bag_index = packed()
    assert not removed_pairs(model(feats, bag_index, len(SIZES)), len(feats), 5)


def test_stkim_never_empties_a_bag():
    scores = torch.randn(6, 3, dtype=torch.float64)
    bag_index = torch.tensor([0, 1, 1, 2, 2, 2])
    keep = stkim_keep(scores, bag_index, 3, top_k=10, prob=1.0)
    for b in range(3):
        assert keep[bag_index == b].sum(0).min() == 1  # n − 1 removed at most: one left per branch


def test_dtfd_pseudo_bags_partition_each_bag():
    _, bag_index = packed()
    for random in (False, True):
        torch.manual_seed(0)
        seg, seg_bag = pseudo_bags(bag_index, len(SIZES), 4, random=random)
        counts = segment_count(seg, len(seg_bag))
        assert int(counts.sum()) == sum(SIZES)
        for b, n in enumerate(SIZES):
            mine = counts[seg_bag == b]
            assert len(mine) == min(4, n)
            assert int(mine.max() - mine.min()) <= 1
            assert (seg_bag[seg[bag_index == b]] == b).all()  # an instance's pseudo-bag belongs to its bag


def test_dtfd_split_is_random_in_training_and_fixed_in_eval():
    _, bag_index = packed()
    evals = [pseudo_bags(bag_index, len(SIZES), 4, random=False)[0] for _ in range(2)]
    torch.testing.assert_close(evals[0], evals[1], rtol=0, atol=0)
    rows = (bag_index == len(SIZES) - 1).nonzero().squeeze(1)
    torch.testing.assert_close(evals[0][rows] - evals[0][rows].min(), torch.arange(len(rows)) % 4, rtol=0, atol=0)  # round-robin
    trains = []
    for seed in range(3):
        torch.manual_seed(seed)
        trains.append(pseudo_bags(bag_index, len(SIZES), 4, random=True)[0])
    assert not torch.equal(trains[0], trains[1])
    torch.manual_seed(0)
    assert torch.equal(pseudo_bags(bag_index, len(SIZES), 4, random=True)[0], trains[0])


def test_dtfd_model_eval_is_deterministic_and_training_is_not():
    torch.manual_seed(0)
    model = build_model(model_options("dtfd")(name="dtfd", hidden=8), 5, 2).double()
    feats, bag_index = packed()
    model.eval()
    with torch.no_grad():
        a, b = (model(feats, bag_index, len(SIZES)).logits for _ in range(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        c, d = (model(feats, bag_index, len(SIZES)).extras["tier1_logits"] for _ in range(2))
    assert not torch.equal(c, d)
