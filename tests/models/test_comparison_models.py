"""The rest of the paper's comparison — LossAttn, ILRA-MIL, C2C, MHIM-MIL, IBMIL — against the contract.

Per model (float64, tiny sizes, bags of 1, 3 and 1000 instances):
- a packed batch gives each bag's logits, attention and AEM term exactly as the bag alone (evaluation
  mode; and in training mode where the method is deterministic given its RNG: C2C with every instance
  sampled, MHIM-MIL with only deterministic masks);
- the packed loss's gradient equals the mean of the single-bag gradients (1e-6);
- gradients reach every trainable parameter (softmax-shift-invariant biases excepted, and exactly 0);
- λ = 0 is the method's own loss, which equals a per-bag reference written from the official code
  (ILRA's uses torch's own ``nn.MultiheadAttention``, as the official model does).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aem_dist.config import model_options
from aem_dist.losses import attention_regulariser, total_loss
from aem_dist.models import MODELS, build_model
from aem_dist.models.mhim import mhim_mask

from .reference import ce, linear, params, relu, softmax
from .test_contract import IN_DIM, LAM, OWN_SUITE, SIZES, bag_rows, make_batch

NEW = OWN_SUITE
SHIFT_INVARIANT = {
    "lossattn": set(),
    "ilra": {f"gab_blocks.{i}.{p}.fc_k.bias" for i in range(2) for p in ("project_forward", "project_backward")} | {"pooling.fc_k.bias"},
    "c2c": {"attention.2.bias"},
    "mhim": set(),
    "ibmil": {"attention.2.bias", "W_k.bias"},
}
DETERMINISTIC_TRAINING = {  # overrides under which training mode draws nothing at random
    "c2c": {"c2c_per_cluster": 10_000},
    "mhim": {"mhim_mask_ratio": 0.0, "mhim_mask_ratio_low": 0.2, "mhim_mask_ratio_high": 0.05, "mhim_mask_ratio_high_random": 1.0},
}


def make(name: str, n_classes: int = 2, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"ilra_rank": 2} if name == "ilra" else {}  # rank 1 makes the backward attention trivial (one key)
    heads = {"n_heads": 4} if "n_heads" in model_options(name).model_fields else {}
    model = build_model(model_options(name)(name=name, hidden=16, **heads, **extra, **overrides), IN_DIM, n_classes).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if name == "ibmil":
            model.confounders.copy_(torch.randn_like(model.confounders))
        if name == "mhim":  # a teacher that differs from the student
            for b in model.teacher.buffers():
                b.add_(0.3 * torch.randn_like(b))
    return model.eval()


def run(model, feats, bag_index, labels, lam=LAM):
    out = model(feats, bag_index, len(labels))
    terms = model.loss_terms(out, labels)
    own = sum(terms.values())
    terms["aem"] = attention_regulariser(out, len(labels))
    return out, terms, own, total_loss(terms, lam)


def test_registry_holds_the_new_models():
    assert set(NEW) <= set(MODELS)


def _packed_vs_alone(model, n_classes, training: bool):
    feats, bag_index, labels = make_batch(n_classes)
    model.train(training)
    with torch.no_grad():
        out, terms, _, _ = run(model, feats, bag_index, labels)
        attn = out.instance_attention(bag_index, len(labels))
        single = []
        for b, y in enumerate(labels):
            rows = bag_rows(bag_index, b)
            one = torch.zeros(len(rows), dtype=torch.long)
            alone, alone_terms, _, _ = run(model, feats[rows], one, y.view(1))
            torch.testing.assert_close(out.logits[b : b + 1], alone.logits, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(attn[rows], alone.instance_attention(one, 1), atol=1e-6, rtol=1e-6)
            assert float(attn[rows].sum()) == pytest.approx(1.0, abs=1e-9)
            single.append({k: float(v) for k, v in alone_terms.items()})
    for name, value in terms.items():  # every term of a packed batch is the mean of its bags' terms
        assert float(value) == pytest.approx(np.mean([s[name] for s in single]), abs=1e-9), name


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("name", NEW)
def test_packed_equals_each_bag_alone(name, n_classes):
    _packed_vs_alone(make(name, n_classes), n_classes, training=False)


@pytest.mark.parametrize("name", sorted(DETERMINISTIC_TRAINING))
def test_packed_equals_each_bag_alone_in_training(name):
    _packed_vs_alone(make(name, 2, **DETERMINISTIC_TRAINING[name]), 2, training=True)


def _grads(model, feats, bag_index, labels):
    model.zero_grad(set_to_none=True)
    run(model, feats, bag_index, labels)[3].backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("name", NEW)
def test_packed_gradient_is_mean_of_single_bag_gradients(name, training):
    if training and name not in DETERMINISTIC_TRAINING:
        training = False  # no randomness in training: same as evaluation mode
    model = make(name, 2, **(DETERMINISTIC_TRAINING.get(name, {}) if training else {})).train(training)
    feats, bag_index, labels = make_batch(2)
    packed = _grads(model, feats, bag_index, labels)
    singles = [_grads(model, feats[bag_rows(bag_index, b)], torch.zeros(n, dtype=torch.long), labels[b : b + 1]) for b, n in enumerate(SIZES)]
    for pname, g in packed.items():
        mean = sum(s[pname] for s in singles) / len(singles)
        torch.testing.assert_close(g, mean, atol=1e-6, rtol=1e-6, msg=lambda m, pname=pname: f"{name}.{pname}: {m}")


@pytest.mark.parametrize("name", NEW)
def test_gradients_reach_every_trainable_parameter(name):
    model = make(name, 2).train()  # training mode: C2C samples, MHIM-MIL masks
    feats, bag_index, labels = make_batch(2)
    run(model, feats, bag_index, labels)[3].backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: no/non-finite gradient in {pname}"
        if pname in SHIFT_INVARIANT[name]:
            assert float(p.grad.abs().max()) < 1e-10, f"{name}: {pname} should be softmax-shift invariant"
        else:
            assert float(p.grad.abs().max()) > 0, f"{name}: zero gradient in {pname}"


# ---- per-bag references from the official code ----


def _ref_lossattn(model, p, x, y):
    h = relu(linear(p, "embed.0", x))
    c = linear(p, "classifier", h)  # (N, C)
    e = np.exp(c - c.max()).sum(axis=1)
    a = e / e.sum()
    logits = linear(p, "classifier", (x.shape[0] * a[:, None] * h).mean(axis=0))
    inst = np.mean([a[i] * ce(c[i], y) for i in range(len(h))])
    return logits, ce(logits, y) + model.weight * inst, a


def _ref_c2c_eval(model, p, x, y):
    h = relu(linear(p, "embed.0", x))
    s = linear(p, "attention.2", np.tanh(linear(p, "attention.0", h)))[:, 0]
    a = softmax(s)
    logits = linear(p, "classifier", a @ h)
    inst = np.mean([ce(c, y) for c in linear(p, "patch_classifier", h)])
    n = len(h)
    kl = sum((1 / n) * (math.log(1 / n) - math.log(v)) for v in a) if n > 4 else 0.0  # F.kl_div(log p, u, 'batchmean')
    return logits, ce(logits, y) + model.beta * inst + model.gamma * kl, a


def _ref_mhim_eval(model, p, x, y):
    h = relu(linear(p, "encoder.embed.0", x))
    a = softmax(linear(p, "encoder.attention.2", relu(linear(p, "encoder.attention.0", h)))[:, 0])
    logits = linear(p, "classifier", a @ h)
    return logits, ce(logits, y), a


def _ref_ibmil(model, p, x, y):
    a = softmax(linear(p, "attention.2", np.tanh(linear(p, "attention.0", x)))[:, 0])
    m = a @ x
    conf = model.confounders.double().numpy()
    k = linear(p, "W_k", conf)
    b = softmax(k @ linear(p, "W_q", m) / math.sqrt(k.shape[1]))
    logits = linear(p, "classifier", np.concatenate([m, b @ conf]))
    return logits, ce(logits, y), a


def _ref_ilra(model, p, x, y):
    """The official ILRA forward for one bag (1, N, D), with torch.nn.MultiheadAttention."""

    def mab(block, q_in, k_in):
        mha = torch.nn.MultiheadAttention(block.in_proj_weight.shape[1], block.heads).double()
        with torch.no_grad():
            mha.in_proj_weight.copy_(block.in_proj_weight)
            mha.in_proj_bias.copy_(block.in_proj_bias)
            mha.out_proj.weight.copy_(block.out_proj.weight)
            mha.out_proj.bias.copy_(block.out_proj.bias)
        q0 = q_in
        q = block.fc_q(q_in).transpose(0, 1)
        k, v = block.fc_k(k_in).transpose(0, 1), block.fc_v(k_in).transpose(0, 1)
        att, weights = mha(q, k, v)  # weights averaged over heads: (1, Lq, Lk)
        o = (q + att).transpose(0, 1)
        o = block.ln0(o)
        o = o + F.relu(block.fc_o(o))
        o = block.ln1(o)
        if block.gate is not None:
            o = o * block.gate(q0)
        return o, weights

    with torch.no_grad():
        xt = torch.from_numpy(x).unsqueeze(0)
        for gab in model.gab_blocks:
            hid, _ = mab(gab.project_forward, gab.latent.unsqueeze(0), xt)
            xt, _ = mab(gab.project_backward, xt, hid)
        feat, w = mab(model.pooling, model.seed.unsqueeze(0), xt)
        logits = model.classifier(feat)[0, 0].numpy()
    return logits, ce(logits, y), w[0, 0].numpy()


REFERENCES = {"lossattn": _ref_lossattn, "c2c": _ref_c2c_eval, "mhim": _ref_mhim_eval, "ibmil": _ref_ibmil, "ilra": _ref_ilra}


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("name", NEW)
def test_own_loss_matches_the_official_forward_and_lambda_zero_is_it(name, n_classes):
    model = make(name, n_classes)
    feats, bag_index, labels = make_batch(n_classes, sizes=(1, 3, 40))
    with torch.no_grad():
        out, terms, own, total = run(model, feats, bag_index, labels)
        zero = total_loss(terms, 0.0)
        attn = out.instance_attention(bag_index, len(labels))
    p = params(model)
    losses = []
    for b, y in enumerate(labels.tolist()):
        rows = bag_rows(bag_index, b)
        logits, loss, a = REFERENCES[name](model, p, feats[rows].numpy(), y)
        np.testing.assert_allclose(out.logits[b].numpy(), logits, atol=1e-9, rtol=1e-9)
        np.testing.assert_allclose(attn[rows].numpy(), a, atol=1e-9, rtol=1e-9)  # (ILRA: mean over heads, as torch's)
        losses.append(loss)
    assert float(own) == pytest.approx(np.mean(losses), abs=1e-9)
    assert float(zero) == pytest.approx(float(own), abs=1e-12)
    assert float(total) == pytest.approx(float(own) + LAM * float(terms["aem"]), abs=1e-12)
    assert float(terms["aem"]) < 0  # the attention AEM regularises is there


# ---- MHIM-MIL: masking and the EMA teacher ----


def test_mhim_masks_the_official_counts():
    g = torch.Generator().manual_seed(0)
    sizes = [1, 2, 10, 101, 400]
    bag_index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    attn = torch.rand(len(bag_index), generator=g, dtype=torch.float64)

    def masked_sets(**ratios):
        keep = mhim_mask(attn, bag_index, len(sizes), **ratios)
        return [(bag_rows(bag_index, b), set(bag_rows(bag_index, b)[~keep[bag_rows(bag_index, b)]].tolist())) for b in range(len(sizes))]

    for rows, masked in masked_sets(random_ratio=0.0, low_ratio=0.1, high_ratio=0.0, high_random=1.0):
        n = len(rows)
        lowest = rows[torch.argsort(attn[rows])].tolist()[: math.ceil(n * 0.1)]
        assert masked == (set(lowest) if n > 1 else set())  # a bag never loses its last instance
    for seed in range(3):
        torch.manual_seed(seed)
        for rows, masked in masked_sets(random_ratio=0.0, low_ratio=0.0, high_ratio=0.02, high_random=0.5):
            n = len(rows)
            k = math.ceil(n * 0.02 / 0.5)  # candidates: the top ⌈n·r_h/ρ⌉, of which ⌈k·ρ⌉ are masked at random
            assert masked <= set(rows[torch.argsort(attn[rows], descending=True)].tolist()[:k])
            assert len(masked) == min(math.ceil(k * 0.5), n - 1)
        for rows, masked in masked_sets(random_ratio=0.5, low_ratio=0.0, high_ratio=0.0, high_random=1.0):
            assert len(masked) == min(math.ceil(len(rows) * 0.5), len(rows) - 1)


def test_mhim_teacher_is_an_ema_in_the_state_dict_not_trained():
    model = build_model(model_options("mhim")(name="mhim", hidden=8, mhim_momentum=0.9), IN_DIM, 2)
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith("teacher") for n in names)
    state = model.state_dict()
    assert {f"teacher.{n.removeprefix('encoder.').replace('.', '__')}" for n in names if n.startswith("encoder.")} <= set(state)
    before = {k: v.clone() for k, v in model.teacher_params().items()}
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.after_step(0.25)
    for name, p in model.encoder.named_parameters():
        torch.testing.assert_close(model.teacher_params()[name], 0.9 * before[name] + 0.1 * p.detach())
    assert float(model.progress) == 0.25


def test_mhim_high_mask_ratio_decays_by_cosine():
    model = build_model(model_options("mhim")(name="mhim", hidden=8), IN_DIM, 2)
    assert model.high_ratio() == pytest.approx(0.01)
    model.after_step(0.5)
    assert model.high_ratio() == pytest.approx(0.005)
    model.after_step(1.0)
    assert model.high_ratio() == pytest.approx(0.0, abs=1e-12)


# ---- C2C: clusters cached per slide, deterministic, saved with the model ----


def test_c2c_clusters_once_per_slide_deterministically_and_saves_them():
    from aem_dist.engine.checkpoint import state_from_bytes, state_to_bytes

    feats, bag_index, labels = make_batch(2)
    a = make("c2c").train()
    a(feats, bag_index, 3)
    a(feats, bag_index, 3)
    assert a.clusterings == 3  # one k-means per slide, not per step
    b = make("c2c").train()
    b(feats[bag_index == 2], torch.zeros(1000, dtype=torch.long), 1)
    assert set(b.cache) <= set(a.cache)
    for key in b.cache:
        assert torch.equal(a.cache[key], b.cache[key])  # same seed, same clusters, packed or alone
    big = a.cache[next(k for k in b.cache)]
    assert int(big.max()) == 7 and len(torch.unique(big)) == 8  # min(8, n) clusters
    restored = make("c2c").train()
    restored.load_state_dict(state_from_bytes(state_to_bytes({"model": a.state_dict()}))["model"])  # weights_only
    assert set(restored.cache) == set(a.cache) and restored.clusterings == 0
    restored(feats, bag_index, 3)
    assert restored.clusterings == 0


def test_c2c_samples_per_cluster_in_training():
    feats, bag_index, labels = make_batch(2)
    model = make("c2c").train()
    torch.manual_seed(0)
    out = model(feats, bag_index, 3)
    counts = torch.bincount(bag_index[out.attn_rows], minlength=3)
    assert counts.tolist()[:2] == [1, 3] and int(counts[2]) == 8 * 8  # ≤ 8 from each of 8 clusters of a 1000-instance bag
    torch.manual_seed(1)
    assert not torch.equal(model(feats, bag_index, 3).attn_rows, out.attn_rows)  # a fresh sample every step
