"""Every registered model against the packed-batch contract (float64, tiny sizes).

- a packed batch of bags with very different sizes (1, 3, 1000 instances) gives each bag's output
  exactly as running it alone (eval mode, so ACMIL masks nothing and DTFD splits deterministically);
- gradients reach every parameter;
- the AEM term equals a plain-Python Σ a log a over each head/branch/pseudo-bag of a numpy
  reference forward, averaged as the paper does;
- with λ = 0 the total loss is the model's own loss, which equals the numpy reference's loss;
- the packed loss's gradient equals the mean of the single-bag gradients (1e-6).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from aem_dist.config import ModelConfig, model_options
from aem_dist.losses import attention_regulariser, total_loss
from aem_dist.models import MODELS, build_model

from .reference import REFERENCES, naive_aem, reference

OWN_SUITE = ("lossattn", "ilra", "c2c", "mhim", "ibmil")  # tested against their official code in test_comparison_models.py
ALL = tuple(sorted(set(MODELS) - set(OWN_SUITE)))  # every other registered model: a new one is under this contract at once
SIZES = (1, 3, 1000)
IN_DIM = 6
LAM = 0.3
# Parameters whose gradient is zero by the shift invariance of softmax: a bias added to every score of
# a segment (the score layer's bias; MHA's key bias, which adds the same q·b to every instance).
SHIFT_INVARIANT = {
    "abmil": {"attention.w.bias"},
    "acmil": {"attention.w.bias"},
    "clam_sb": {"attention.w.bias"},
    "dtfd": {"attention1.w.bias", "attention2.w.bias"},
    "mha": {"k_proj.bias"},
}


def test_registry_holds_every_model():
    assert set(OWN_SUITE) <= set(MODELS) and {"abmil", "mha", "dsmil", "acmil", "dtfd", "maxpool", "meanpool", "clam_sb", "transmil"} <= set(ALL)


def make_model(name: str, n_classes: int, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    heads = {"n_heads": 4} if "n_heads" in model_options(name).model_fields else {}
    cfg = model_options(name)(name=name, hidden=16, **heads, **overrides)
    model = build_model(cfg, IN_DIM, n_classes).double()
    with torch.no_grad():  # break symmetries a fresh init may have (MHA's query starts near 0)
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def make_batch(n_classes: int, sizes=SIZES, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(sum(sizes), IN_DIM, generator=g, dtype=torch.float64)
    bag_index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    labels = torch.tensor([b % n_classes for b in range(1, len(sizes) + 1)])  # (1, 0, 1) / (1, 2, 0): every class seen
    return feats, bag_index, labels


def bag_rows(bag_index: torch.Tensor, b: int) -> torch.Tensor:
    return (bag_index == b).nonzero().squeeze(1)


def losses(model, feats, bag_index, labels, lam=LAM):
    out = model(feats, bag_index, len(labels))
    terms = model.loss_terms(out, labels)
    own = sum(terms.values())
    terms["aem"] = attention_regulariser(out, len(labels))
    return out, terms, own, total_loss(terms, lam)


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("name", ALL)
def test_packed_equals_each_bag_alone(name, n_classes):
    model = make_model(name, n_classes)
    feats, bag_index, labels = make_batch(n_classes)
    with torch.no_grad():
        out, terms, _, _ = losses(model, feats, bag_index, labels)
        attn = out.instance_attention(bag_index, len(labels))
        single_aem = []
        for b, y in enumerate(labels):
            rows = bag_rows(bag_index, b)
            one = torch.zeros(len(rows), dtype=torch.long)
            alone, alone_terms, _, _ = losses(model, feats[rows], one, y.view(1))
            torch.testing.assert_close(out.logits[b : b + 1], alone.logits, atol=1e-6, rtol=1e-6)
            alone_attn = alone.instance_attention(one, 1)
            if attn is None:
                assert alone_attn is None
            else:
                torch.testing.assert_close(attn[rows], alone_attn, atol=1e-6, rtol=1e-6)
                assert float(attn[rows].sum()) == pytest.approx(1.0, abs=1e-9)
            single_aem.append(float(alone_terms["aem"]))
    # the AEM term of a packed batch is the mean of its bags' terms
    assert float(terms["aem"]) == pytest.approx(np.mean(single_aem), abs=1e-9)


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_every_parameter(name):
    model = make_model(name, 2).train()  # training mode: ACMIL masks, DTFD splits at random
    feats, bag_index, labels = make_batch(2)
    _, _, _, loss = losses(model, feats, bag_index, labels)
    loss.backward()
    invariant = SHIFT_INVARIANT.get(name, set())
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
        if pname in invariant:
            assert float(p.grad.abs().max()) < 1e-10, f"{name}: {pname} should be softmax-shift invariant"
        else:
            assert float(p.grad.abs().max()) > 0, f"{name}: zero gradient in {pname}"


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("name", ALL)
def test_aem_and_own_loss_match_numpy_reference(name, n_classes):
    model = make_model(name, n_classes)
    feats, bag_index, labels = make_batch(n_classes, sizes=(1, 3, 40))
    with torch.no_grad():
        out, terms, own, total = losses(model, feats, bag_index, labels)
        zero = total_loss(terms, 0.0)
    probs = torch.softmax(out.logits, dim=1).numpy()
    if name not in REFERENCES:  # transmil: attention-free; own loss is the CE of its logits
        assert float(terms["aem"]) == 0.0
        naive_own = np.mean([-np.log(probs[b, y]) for b, y in enumerate(labels.tolist())])
    else:
        refs = [reference(name, model, feats[bag_rows(bag_index, b)].numpy(), y) for b, y in enumerate(labels.tolist())]
        for b, ref in enumerate(refs):
            np.testing.assert_allclose(probs[b], ref.probs, atol=1e-9, rtol=1e-9)
        expected_aem = np.mean([naive_aem(r.attention) for r in refs])
        assert float(terms["aem"]) == pytest.approx(expected_aem, abs=1e-9)
        naive_own = np.mean([r.loss for r in refs])
    assert float(own) == pytest.approx(naive_own, abs=1e-9)
    # λ = 0 is the model's own loss; λ > 0 adds exactly λ·AEM
    assert float(zero) == pytest.approx(float(own), abs=1e-12)
    assert float(total) == pytest.approx(float(own) + LAM * float(terms["aem"]), abs=1e-12)


def _grads(model, feats, bag_index, labels):
    model.zero_grad(set_to_none=True)
    losses(model, feats, bag_index, labels)[3].backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ALL)
def test_packed_gradient_is_mean_of_single_bag_gradients(name):
    model = make_model(name, 2)
    feats, bag_index, labels = make_batch(2)
    packed = _grads(model, feats, bag_index, labels)
    singles = [_grads(model, feats[bag_rows(bag_index, b)], torch.zeros(n, dtype=torch.long), labels[b : b + 1]) for b, n in enumerate(SIZES)]
    for pname, g in packed.items():
        mean = sum(s[pname] for s in singles) / len(singles)
        torch.testing.assert_close(g, mean, atol=1e-6, rtol=1e-6, msg=lambda m, pname=pname: f"{name}.{pname}: {m}")


@pytest.mark.parametrize("name", ["mha", "transmil"])
def test_hidden_must_divide_into_heads(name):
    with pytest.raises(ValueError, match="model.n_heads"):
        build_model(model_options(name)(name=name, hidden=10, n_heads=4), IN_DIM, 2)


def test_unknown_model_name_lists_choices():
    with pytest.raises(ValueError, match="abmil.*transmil"):
        build_model(ModelConfig(name="nope"), IN_DIM, 2)


@pytest.mark.parametrize("name", ("abmil", "mha", "clam_sb", "lossattn"))
def test_embedding_is_the_pooled_vector_the_classifier_reads(name):
    """MILOutput.embedding (B, hidden) is the pooled bag embedding z: the classifier of z gives the logits."""
    model = make_model(name, 2).eval()
    feats, bag_index, labels = make_batch(2)
    out = model(feats, bag_index, len(SIZES))
    assert out.embedding is not None and out.embedding.shape == (len(SIZES), 16)  # hidden
    torch.testing.assert_close(model.classifier(out.embedding), out.logits)


def test_models_without_an_obvious_embedding_leave_it_none():
    model = make_model("meanpool", 2).eval()
    feats, bag_index, _ = make_batch(2)
    assert model(feats, bag_index, len(SIZES)).embedding is None
