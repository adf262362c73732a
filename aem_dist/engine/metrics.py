"""Classification metrics over all bags of a split, attention statistics, best-epoch selection.

Metrics are computed from per-bag predictions gathered from every rank first (see
:mod:`aem_dist.engine.evaluate`); never per rank and averaged.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from .selection import BestTracker

SPLIT_METRICS = ("auc", "f1", "acc", "balanced_acc", "loss", "attn_entropy", "attn_entropy_norm", "attn_top1pct")


def macro_auc(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """Macro one-vs-rest AUC over the classes whose AUC is defined.

    A class's one-vs-rest AUC needs bags of it and bags of other classes; a class absent from the
    split (or the only class in it) has none and is left out of the average, as torchmetrics'
    ``MulticlassAUROC(average="macro")`` — the metric of the official AEM/ACMIL code — leaves out the
    classes whose AUC comes out NaN. With two classes both present this is the plain binary AUC
    (class 0's AUC on p0 = 1 − p1 equals class 1's). NaN only when fewer than two classes are present.
    Note: torchmetrics ≥ 1.0 with ``thresholds=None`` scores an absent class 0 instead of NaN (so it
    drags the average down); we follow the leave-out rule, which is what its reduction intends.
    """
    present = [c for c in range(n_classes) if 0 < int((labels == c).sum()) < len(labels)]
    if not present:
        return math.nan
    return float(np.mean([roc_auc_score((labels == c).astype(np.int64), probs[:, c]) for c in present]))


def macro_f1(pred: np.ndarray, labels: np.ndarray) -> float:
    """Macro F1 of the argmax over the classes that occur in the labels or the predictions.

    torchmetrics' ``MulticlassF1Score(average="macro")`` gives a class with tp + fp + fn = 0 (absent
    from the split and never predicted) weight 0, i.e. leaves it out; a class absent from the labels
    but predicted counts with F1 0. sklearn with all class labels would count the first kind as 0 too.
    """
    seen = np.union1d(labels, pred)
    return float(f1_score(labels, pred, average="macro", labels=seen, zero_division=0))


def _balanced_accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
    """sklearn's balanced accuracy (mean recall over the classes present); its warning about predicted
    classes absent from the labels is already covered by the val-split warning, once per run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(labels, pred))


def classification_metrics(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, float]:
    """Macro one-vs-rest AUC (:func:`macro_auc`), macro F1 of the argmax (:func:`macro_f1`), accuracy,
    balanced accuracy and ``loss``: the mean negative log-likelihood of the true label under the
    predicted probabilities (classification only, without AEM or model-specific terms).

    ``probs`` (N, C) rows sum to 1; ``labels`` (N,).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return {"auc": math.nan, "f1": math.nan, "acc": math.nan, "balanced_acc": math.nan, "loss": math.nan}
    pred = probs.argmax(axis=1)
    nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-300, None))
    return {
        "auc": macro_auc(probs, labels, n_classes),
        "f1": macro_f1(pred, labels),
        "acc": float(accuracy_score(labels, pred)),
        "balanced_acc": _balanced_accuracy(labels, pred),
        "loss": float(nll.mean()),
    }


def bag_attention_stats(a: np.ndarray) -> tuple[float, float, float]:
    """One bag's attention (sums to 1): entropy (nats), entropy / log N, share of the top 1 % of instances.

    A one-instance bag has normalised entropy 1 (it is trivially uniform).
    """
    a = np.asarray(a, dtype=np.float64)
    pos = a[a > 0]
    h = float(-(pos * np.log(pos)).sum())
    norm = h / math.log(len(a)) if len(a) > 1 else 1.0
    k = max(1, math.ceil(0.01 * len(a)))
    return h, norm, float(np.sort(a)[-k:].sum())


def attention_stats(per_bag: Sequence[tuple[float, float, float]]) -> dict[str, float]:
    """Means over bags of :func:`bag_attention_stats` rows."""
    if not per_bag:
        return {"attn_entropy": math.nan, "attn_entropy_norm": math.nan, "attn_top1pct": math.nan}
    m = np.asarray(per_bag, dtype=np.float64).mean(axis=0)
    return {"attn_entropy": float(m[0]), "attn_entropy_norm": float(m[1]), "attn_top1pct": float(m[2])}


def select_best(history: Sequence[dict[str, Any]], metric: str = "auc+f1", tie: str = "val_loss") -> int | None:
    """Index into ``history`` of the epoch :class:`~aem_dist.engine.selection.BestTracker` selects."""
    tracker = BestTracker(metric, tie)
    best_i = None
    for i, row in enumerate(history):
        if "val" in row and tracker.update(int(row.get("epoch", i)), row["val"]):
            best_i = i
    return best_i
