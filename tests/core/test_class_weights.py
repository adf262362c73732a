"""train.class_weights: each bag's slide-label cross-entropy × its class's weight, then the plain mean over
bags — checked against a per-bag reference in float64 for every model under the packed-batch contract,
and for populations (a member equals its standalone run)."""

from __future__ import annotations

import pytest
import torch

from aem_dist.config import ConfigError, load_config
from aem_dist.engine.loop import fit, fit_members
from aem_dist.losses import attention_regulariser, class_weights, total_loss
from tests.core.test_population import _assert_same_history, _cfgs, float64, small_data  # noqa: F401  (fixtures)
from tests.models.test_contract import ALL, LAM, SIZES, bag_rows, make_batch, make_model

WEIGHTS = (2.5, 0.4)
WEIGHTED = {"ce", "ce_max", "ce_branch", "ce_tier1"}  # the terms that are slide-label cross-entropies (docs/training.md)


def test_balanced_is_n_over_classes_times_count_and_bad_specs_name_the_key():
    assert class_weights("none", [60, 40]) is None
    assert class_weights("balanced", [60, 40]) == pytest.approx((100 / 120, 100 / 80))
    assert class_weights([1, 3.5], [60, 40]) == (1.0, 3.5)
    with pytest.raises(ValueError, match=r"train.class_weights has 3 weights for the dataset's 2 classes \(normal, tumour\)"):
        class_weights([1, 2, 3], [60, 40], ["normal", "tumour"])
    with pytest.raises(ValueError, match="train.class_weights=balanced: the training split has no bag of class tumour"):
        class_weights("balanced", [60, 0], ["normal", "tumour"])
    with pytest.raises(ConfigError, match="train.class_weights"):
        load_config("demo", ["train.class_weights=[1.0, -2.0]"])
    with pytest.raises(ConfigError, match="train.class_weights"):
        load_config("demo", ["train.class_weights=inverse"])
    assert load_config("demo", ["train.class_weights=[1.0, 2.0]"]).train.class_weights == [1.0, 2.0]


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


def _weighted_bag_loss(model, feats, labels):
    """The reference: one bag alone, unweighted terms, each slide-label CE term × w[y] by hand."""
    model.class_weights = None
    out = model(feats, torch.zeros(len(feats), dtype=torch.long), 1)
    terms = model.loss_terms(out, labels)
    w = WEIGHTS[int(labels[0])]
    return sum((w if name in WEIGHTED else 1.0) * v for name, v in terms.items()) + LAM * attention_regulariser(out, 1)


@pytest.mark.parametrize("name", ALL)
def test_weighted_packed_gradient_is_the_mean_of_weighted_single_bag_gradients(name):
    model = make_model(name, 2)
    feats, bag_index, labels = make_batch(2)
    model.class_weights = WEIGHTS
    out = model(feats, bag_index, len(labels))
    terms = model.loss_terms(out, labels)
    terms["aem"] = attention_regulariser(out, len(labels))
    packed_loss = total_loss(terms, LAM)
    packed = _grads(model, packed_loss)
    singles, single_losses = [], []
    for b in range(len(SIZES)):
        loss = _weighted_bag_loss(model, feats[bag_rows(bag_index, b)], labels[b : b + 1])
        single_losses.append(float(loss.detach()))
        singles.append(_grads(model, loss))
    assert float(packed_loss) == pytest.approx(sum(single_losses) / len(SIZES), abs=1e-10)
    model.class_weights = None
    out = model(feats, bag_index, len(labels))
    plain = _grads(model, sum(model.loss_terms(out, labels).values()) + LAM * attention_regulariser(out, len(labels)))
    assert any(not torch.allclose(plain[p], packed[p]) for p in packed)  # the weights change the gradient
    for pname, g in packed.items():
        mean = sum(s[pname] for s in singles) / len(singles)
        torch.testing.assert_close(g, mean, atol=1e-9, rtol=1e-9, msg=lambda m, pname=pname: f"{name}.{pname}: {m}")


@pytest.mark.parametrize("model", ["abmil", "dsmil"])  # vectorised members, and members run one after another
def test_weighted_population_member_equals_its_standalone_run(small_data, float64, model):  # noqa: F811
    cfgs = _cfgs(small_data, model, [{"loss.lam": 0.0, "train.seed": 0}, {"loss.lam": 0.1, "train.seed": 1}], "train.class_weights=[3.0,0.5]")
    pop = fit_members(cfgs)
    plain = fit(_cfgs(small_data, model, [{"loss.lam": 0.0, "train.seed": 0}])[0])
    assert pop[0].history[0]["train"]["ce"] != pytest.approx(plain.history[0]["train"]["ce"], rel=1e-3)  # weighted CE differs
    for k, cfg in enumerate(cfgs):
        solo = fit(cfg)
        _assert_same_history(pop[k].history, solo.history)
        assert pop[k].best_epoch == solo.best_epoch
