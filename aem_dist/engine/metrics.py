"""Classification metrics over all bags of a split, attention statistics, best-epoch selection.

Metrics are computed from per-bag predictions gathered from every rank first (see
:mod:`aem_dist.engine.evaluate`); never per rank and averaged.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

SPLIT_METRICS = ("auc", "f1", "acc", "balanced_acc", "attn_entropy", "attn_entropy_norm", "attn_top1pct")


def classification_metrics(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, float]:
    """Macro one-vs-rest AUC, macro F1 of the argmax, accuracy and balanced accuracy.

    ``probs`` (N, C) rows sum to 1; ``labels`` (N,). AUC is NaN when a split lacks a class.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return {"auc": math.nan, "f1": math.nan, "acc": math.nan, "balanced_acc": math.nan}
    pred = probs.argmax(axis=1)
    present = np.unique(labels)
    if len(present) < 2:
        auc = math.nan
    elif n_classes == 2:
        auc = float(roc_auc_score(labels, probs[:, 1]))
    elif len(present) < n_classes:
        auc = math.nan
    else:
        auc = float(roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(range(n_classes))))
    return {
        "auc": auc,
        "f1": float(f1_score(labels, pred, average="macro", labels=list(range(n_classes)), zero_division=0)),
        "acc": float(accuracy_score(labels, pred)),
        "balanced_acc": float(balanced_accuracy_score(labels, pred)),
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


def selection_score(val: dict[str, float], metric: str = "auc+f1") -> float:
    """The validation score used to pick the test epoch (NaN counts as -inf)."""
    parts = metric.split("+")
    value = sum(val.get(p, math.nan) for p in parts)
    return -math.inf if value != value else float(value)


def select_best(history: Sequence[dict[str, Any]], metric: str = "auc+f1") -> int | None:
    """Index into ``history`` of the epoch with the best validation score; ties keep the earlier epoch."""
    best, best_i = -math.inf, None
    for i, row in enumerate(history):
        if "val" not in row:
            continue
        score = selection_score(row["val"], metric)
        if best_i is None or score > best:
            best, best_i = score, i
    return best_i
