"""The instance-level linear probe of a synthetic dataset: how well one linear direction separates
tumour from normal instances, the number a frozen pathology encoder is usually judged by (a patch-level
linear probe, tumour vs normal).

A logistic regression (scikit-learn) fits a uniform sample of the train and val bags' instances (so
tumour, normal and mimic instances come in their natural proportions, as in a patch-level probe set)
and is scored on a uniform sample of the test bags': ``auc`` is one probe, tumour vs everything else
(mimics included, as normal); ``auc_by_subtype`` a probe per tumour sub-prototype, its instances vs
normal ones without mimics (how discriminative that sub-prototype is on its own); ``mimic_auc`` the
first probe's score of mimics vs normal instances (near 1: mimics look like tumour to it). The sample
is drawn from its own RNG stream, so the probe never changes the bags."""

from __future__ import annotations

import numpy as np

from .schema import Bag

PER_BAG = 64  # instances sampled per bag


class ProbeSample:
    """Collects instances bag by bag (``add``) and fits the probe at the end (``result``)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.x: dict[bool, list[np.ndarray]] = {True: [], False: []}  # is test → feature blocks
        self.kind: dict[bool, list[np.ndarray]] = {True: [], False: []}

    def add(self, split: str, index: int, bag: Bag, kind: np.ndarray) -> None:
        rng = np.random.default_rng([self.seed, {"train": 0, "val": 1, "test": 2}[split], index, 4201])
        pick = np.sort(rng.permutation(len(kind))[:PER_BAG])
        test = split == "test"
        self.x[test].append(bag.feats[pick].astype(np.float32))
        self.kind[test].append(kind[pick])

    def result(self) -> dict:
        """{"auc", "auc_by_subtype", "mimic_auc", "n_fit", "n_scored"}; AUCs are None where a side is
        empty (e.g. no test split)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score

        if not self.x[False] or not self.x[True]:
            return {"auc": None, "auc_by_subtype": [], "mimic_auc": None, "n_fit": 0, "n_scored": 0}
        xf, kf = np.concatenate(self.x[False]), np.concatenate(self.kind[False])
        xt, kt = np.concatenate(self.x[True]), np.concatenate(self.kind[True])
        if len(np.unique(kf > 0)) < 2:
            return {"auc": None, "auc_by_subtype": [], "mimic_auc": None, "n_fit": len(kf), "n_scored": len(kt)}
        def fit_score(sel: np.ndarray) -> np.ndarray:
            return LogisticRegression(C=1.0, max_iter=500).fit(xf[sel], kf[sel] > 0).decision_function(xt)

        def auc(score: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float | None:
            if not pos.any() or not neg.any():
                return None
            sel = pos | neg
            return round(float(roc_auc_score(pos[sel], score[sel])), 4)

        score = fit_score(np.ones(len(kf), dtype=bool))
        normal = kt == 0
        by_subtype = []
        for s in range(1, int(max(kf.max(), kt.max(), 1)) + 1):
            own = (kf == s) | (kf == 0)
            by_subtype.append(auc(fit_score(own), kt == s, normal) if (kf == s).any() else None)
        return {"auc": auc(score, kt > 0, kt <= 0), "auc_by_subtype": by_subtype, "mimic_auc": auc(score, kt == -1, normal),
                "n_fit": int(len(kf)), "n_scored": int(len(kt))}
