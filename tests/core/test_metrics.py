import math

import numpy as np
import pytest

from aem_dist.engine.metrics import attention_stats, bag_attention_stats, classification_metrics, select_best


def _auc_pairs(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_binary_metrics_by_hand():
    p1 = np.array([0.9, 0.2, 0.6, 0.4, 0.8, 0.1])
    labels = np.array([1, 0, 1, 1, 0, 0])
    m = classification_metrics(np.stack([1 - p1, p1], 1), labels, 2)
    assert m["auc"] == pytest.approx(_auc_pairs(p1, labels))
    pred = (p1 > 0.5).astype(int)
    assert m["acc"] == pytest.approx((pred == labels).mean())
    tp, fp, fn = 2, 1, 1
    f1_pos = 2 * tp / (2 * tp + fp + fn)
    tn, fn0, fp0 = 2, 1, 1
    f1_neg = 2 * tn / (2 * tn + fp0 + fn0)
    assert m["f1"] == pytest.approx((f1_pos + f1_neg) / 2)


def test_multiclass_macro_ovr_auc_by_hand():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=30)
    labels = np.arange(30) % 3
    m = classification_metrics(probs, labels, 3)
    by_hand = np.mean([_auc_pairs(probs[:, c], (labels == c).astype(int)) for c in range(3)])
    assert m["auc"] == pytest.approx(by_hand)
    recalls = [np.mean(probs[labels == c].argmax(1) == c) for c in range(3)]
    assert m["balanced_acc"] == pytest.approx(np.mean(recalls))


def test_auc_undefined_when_a_class_is_missing():
    assert math.isnan(classification_metrics(np.array([[0.3, 0.7], [0.6, 0.4]]), np.array([1, 1]), 2)["auc"])


def test_absent_class_is_left_out_of_macro_auc_and_f1():
    """The official metric's semantics (torchmetrics macro): a class with no bags is left out."""
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), size=20)
    labels = np.arange(20) % 2  # class 2 absent
    pred = probs.argmax(1)
    m = classification_metrics(probs, labels, 3)
    assert m["auc"] == pytest.approx(np.mean([_auc_pairs(probs[:, c], (labels == c).astype(int)) for c in (0, 1)]))
    seen = sorted(set(labels) | set(pred))
    f1 = []
    for c in seen:
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        f1.append(2 * tp / (2 * tp + fp + fn))
    assert m["f1"] == pytest.approx(np.mean(f1))
    # a class neither present nor predicted does not pull macro F1 down
    two = classification_metrics(np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]]), np.array([0, 1]), 3)
    assert two["f1"] == 1.0 and two["auc"] == 1.0
    assert two["loss"] == pytest.approx(-(np.log(0.9) + np.log(0.8)) / 2)


def test_attention_stats():
    h, norm, top = bag_attention_stats(np.full(200, 1 / 200))
    assert h == pytest.approx(math.log(200)) and norm == pytest.approx(1.0) and top == pytest.approx(2 / 200)
    h, norm, top = bag_attention_stats(np.array([1.0, 0.0, 0.0]))
    assert (h, norm, top) == (0.0, 0.0, 1.0)
    assert bag_attention_stats(np.array([1.0]))[1] == 1.0
    s = attention_stats([(1.0, 0.5, 0.2), (3.0, 1.0, 0.4)])
    assert s == {"attn_entropy": 2.0, "attn_entropy_norm": 0.75, "attn_top1pct": pytest.approx(0.3)}


def test_best_val_selection_uses_auc_plus_f1_and_documented_ties():
    history = [
        {"epoch": 0, "val": {"auc": 0.70, "f1": 0.60}},
        {"epoch": 1, "val": {"auc": 0.80, "f1": 0.60, "loss": 0.5}},
        {"epoch": 2, "val": {"auc": 0.60, "f1": 0.80, "loss": 0.6}},  # ties epoch 1 with a higher val loss
        {"epoch": 3},  # not evaluated
        {"epoch": 4, "val": {"auc": float("nan"), "f1": 0.99}},  # NaN is never best
        {"epoch": 5, "val": {"auc": 0.79, "f1": 0.62}},  # 1.41 > 1.40
    ]
    assert select_best(history) == 5
    assert select_best(history[:5]) == 1  # tie: the lower val loss
    assert select_best(history[:5], tie="later") == 2
    assert select_best(history[:5], tie="earlier") == 1
    assert select_best(history, "auc") == 1
    assert select_best(history, "last") == 5
