"""The core math of ABMIL + AEM, exact in float64 (DESIGN.md "The math that must be exact")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aem_dist.config import ModelConfig
from aem_dist.losses import attention_regulariser, total_loss, uniform_neg_entropy
from aem_dist.models import build_model
from aem_dist.models.segment import segment_log_softmax, segment_softmax

SIZES = (1, 5, 2, 300)
DIM = 7


@pytest.fixture
def model():
    torch.manual_seed(3)
    return build_model(ModelConfig(name="abmil", hidden=12), DIM, 3).double()


def batch(sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(sum(sizes), DIM, generator=g, dtype=torch.float64)
    bag_index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    labels = torch.tensor([0, 2, 1, 2][: len(sizes)])
    return feats, bag_index, labels


def step_loss(model, feats, bag_index, labels, lam):
    out = model(feats, bag_index, len(labels))
    terms = model.loss_terms(out, labels) | {"aem": attention_regulariser(out, len(labels))}
    return out, terms, total_loss(terms, lam)


def naive_bag(model, x):
    """Plain-numpy gated attention of one bag: (attention, logits)."""
    p = {n: t.detach().numpy() for n, t in model.named_parameters()}
    h = np.maximum(x @ p["embed.0.weight"].T, 0)
    gate = np.tanh(h @ p["attention.V.weight"].T + p["attention.V.bias"]) / (1 + np.exp(-(h @ p["attention.U.weight"].T + p["attention.U.bias"])))
    s = (gate @ p["attention.w.weight"].T + p["attention.w.bias"])[:, 0]
    a = np.exp(s - s.max())
    a /= a.sum()
    return a, (a @ h) @ p["classifier.weight"].T + p["classifier.bias"]


@pytest.mark.parametrize("lam", [0.0, 0.1, 2.0])
def test_packed_loss_and_every_gradient_are_the_mean_over_bags(model, lam):
    feats, bag_index, labels = batch()
    model.zero_grad()
    _, _, loss = step_loss(model, feats, bag_index, labels, lam)
    loss.backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    single_losses, single_grads = [], []
    for b in range(len(SIZES)):
        rows = bag_index == b
        model.zero_grad()
        _, _, l_b = step_loss(model, feats[rows], torch.zeros(int(rows.sum()), dtype=torch.long), labels[b : b + 1], lam)
        l_b.backward()
        single_losses.append(float(l_b.detach()))
        single_grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert float(loss.detach()) == pytest.approx(np.mean(single_losses), abs=1e-12)
    for name, g in packed.items():
        torch.testing.assert_close(g, sum(s[name] for s in single_grads) / len(SIZES), atol=1e-6, rtol=1e-6)


def test_attention_sums_to_one_per_bag_and_matches_naive(model):
    feats, bag_index, labels = batch()
    with torch.no_grad():
        out = model(feats, bag_index, len(SIZES))
        a = out.instance_attention(bag_index, len(SIZES))
        by_softmax = segment_softmax(out.attn_scores, bag_index, len(SIZES))[:, 0]
    for b in range(len(SIZES)):
        rows = bag_index == b
        assert float(a[rows].sum()) == pytest.approx(1.0, abs=1e-12)
        naive_a, naive_logits = naive_bag(model, feats[rows].numpy())
        np.testing.assert_allclose(a[rows].numpy(), naive_a, atol=1e-12)
        np.testing.assert_allclose(by_softmax[rows].numpy(), naive_a, atol=1e-12)
        np.testing.assert_allclose(out.logits[b].numpy(), naive_logits, atol=1e-12)


def test_lambda_zero_is_plain_cross_entropy(model):
    feats, bag_index, labels = batch()
    with torch.no_grad():
        out, terms, loss = step_loss(model, feats, bag_index, labels, 0.0)
    assert set(terms) == {"ce", "aem"}
    assert float(terms["aem"]) < 0  # the AEM term is there, only weighted 0
    naive = []
    for b, y in enumerate(labels.tolist()):
        _, logits = naive_bag(model, feats[bag_index == b].numpy())
        naive.append(-(logits[y] - np.log(np.exp(logits).sum())))
    assert float(loss) == pytest.approx(np.mean(naive), abs=1e-12)
    assert float(loss) == pytest.approx(float(F.cross_entropy(out.logits, labels)), abs=1e-15)


def test_aem_is_sum_p_log_p_per_bag_averaged(model):
    feats, bag_index, labels = batch()
    with torch.no_grad():
        out, terms, loss = step_loss(model, feats, bag_index, labels, 0.5)
    per_bag = []
    for b in range(len(SIZES)):
        a, _ = naive_bag(model, feats[bag_index == b].numpy())
        per_bag.append(sum(float(v) * math.log(float(v)) for v in a))
    assert per_bag[0] == 0.0  # a one-instance bag has attention 1 and no entropy to gain
    assert float(terms["aem"]) == pytest.approx(np.mean(per_bag), abs=1e-12)
    assert float(loss) == pytest.approx(float(terms["ce"]) + 0.5 * np.mean(per_bag), abs=1e-12)


def test_kl_uniform_is_kl_from_uniform_to_attention_per_bag(model):
    """The KL ablation is KL(u ‖ a) = Σ_i (1/N) log((1/N) / a_i) per bag, averaged over bags — and it is a
    different objective from AEM: its gradient is not AEM's (KL(a ‖ u) would have had exactly AEM's)."""
    feats, bag_index, labels = batch()
    out = model(feats, bag_index, len(labels))
    kl = attention_regulariser(out, len(labels), kind="kl_uniform")
    per_bag = []
    for b in range(len(SIZES)):
        a, _ = naive_bag(model, feats[bag_index == b].numpy())
        n = len(a)
        per_bag.append(sum((1.0 / n) * math.log((1.0 / n) / float(v)) for v in a))
    assert per_bag[0] == 0.0 and all(v > 0 for v in per_bag[1:])  # 0 only where attention is uniform
    assert kl.item() == pytest.approx(np.mean(per_bag), abs=1e-12)
    w = dict(model.named_parameters())["attention.w.weight"]  # the attention scores' last layer
    g_kl = torch.autograd.grad(kl, w, retain_graph=True)[0]
    g_aem = torch.autograd.grad(attention_regulariser(out, len(labels)), w)[0]
    assert not torch.allclose(g_kl, g_aem, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("n", [1, 2, 17, 1000])
def test_uniform_bag_has_minus_log_n(model, n):
    # identical instances get identical scores: the attention is exactly uniform
    feats = torch.randn(1, DIM, dtype=torch.float64).repeat(n, 1)
    with torch.no_grad():
        out = model(feats, torch.zeros(n, dtype=torch.long), 1)
        aem = attention_regulariser(out, 1)
        kl = attention_regulariser(out, 1, kind="kl_uniform")
    assert float(aem) == pytest.approx(-math.log(n), abs=1e-12)
    assert float(aem) == pytest.approx(uniform_neg_entropy(n), abs=1e-12)
    assert float(kl) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("scale", [1e3, 1e6, 1e300])
def test_segment_softmax_is_stable_for_huge_scores(scale):
    scores = torch.tensor([[1.0], [0.5], [-1.0], [1.0], [0.0], [2.0]], dtype=torch.float64) * scale
    index = torch.tensor([0, 0, 0, 1, 2, 2])
    log_a = segment_log_softmax(scores, index, 3)
    a = torch.exp(log_a)
    assert torch.isfinite(a).all()
    assert torch.isfinite(log_a[a > 0]).all()
    sums = torch.zeros(3, dtype=torch.float64).index_add_(0, index, a[:, 0])
    torch.testing.assert_close(sums, torch.ones(3, dtype=torch.float64))
    assert float(a[0, 0]) == pytest.approx(1.0) and float(a[5, 0]) == pytest.approx(1.0)
    assert float(a[3, 0]) == 1.0  # single-row segment
    # Σ a log a stays finite (0 for these near-one-hot segments) — no 0·log 0 = NaN
    from aem_dist.losses import segment_neg_entropy

    ent = segment_neg_entropy(log_a, index, 3)
    assert torch.isfinite(ent).all()
    torch.testing.assert_close(ent, torch.zeros(3, 1, dtype=torch.float64), atol=1e-12, rtol=0)


def test_segment_softmax_of_moderate_scores_matches_torch_softmax():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(9, 2, generator=g, dtype=torch.float64) * 30 + 500
    index = torch.tensor([1, 1, 0, 1, 0, 2, 2, 2, 2])  # rows of a segment need not be contiguous
    a = segment_softmax(scores, index, 3)
    for s in range(3):
        torch.testing.assert_close(a[index == s], torch.softmax(scores[index == s], dim=0))
