"""Best-epoch selection: which epoch's model and test metrics a run reports.

One :class:`BestTracker` per trained model (a population keeps one per member). After each
evaluated epoch ``update(epoch, val_metrics)`` says whether that epoch is the new best.

Rules (documented in docs/training.md):

- ``train.select_metric``: ``auc+f1`` (the official AEM/ACMIL rule), ``auc``, ``f1`` (higher is
  better), ``loss`` (the validation NLL, lower is better) or ``last`` (every evaluated epoch
  replaces the previous one, so the last evaluated epoch is reported).
- A NaN score is never best: an epoch whose score is undefined (e.g. AUC with a single class in the
  val split) cannot displace a finite one, and while no epoch has a finite score none is best.
- Ties (exactly equal scores) are broken by ``train.select_tie``: ``val_loss`` (default: the lower
  validation loss wins; equal or unknown loss → the later epoch), ``later`` (the later epoch), or
  ``earlier`` (the earlier epoch stays — the official code's strict ``>``). On tiny val splits AUC
  saturates at 1.0 within a few epochs; the strict rule then pins the reported model to a barely
  trained epoch, hence the default.
- ``train.patience`` (early stopping): after an evaluated epoch e before the last, the run stops once
  ``e − best_epoch ≥ patience`` (counted from epoch −1 while no epoch has a finite score). The stop only
  ends training: the selected epoch is the best of the epochs trained, by the same rules.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence, get_args

from ..config import SelectMetric, SelectTie

log = logging.getLogger(__name__)

SELECT_METRICS, TIE_BREAKS = get_args(SelectMetric), get_args(SelectTie)
MIN_VAL_BAGS = 20


def score_of(val: dict[str, float], metric: str) -> float:
    """The selection score of one epoch's val metrics, oriented so that higher is better; NaN if undefined.

    ``auc+f1`` is the sum (NaN if either part is); ``loss`` is the negated val loss; ``last`` is 0.
    """
    if metric == "last":
        return 0.0
    if metric == "loss":
        return -float(val.get("loss", math.nan))
    return float(sum(float(val.get(p, math.nan)) for p in metric.split("+")))


class BestTracker:
    """Running best-epoch selection under one ``select_metric`` and tie rule.

    Raises ``ValueError`` for an unknown metric or tie rule.
    """

    def __init__(self, select_metric: str = "auc+f1", tie: str = "val_loss", patience: int | None = None):
        if select_metric not in SELECT_METRICS:
            raise ValueError(f"train.select_metric {select_metric!r} is not one of {', '.join(SELECT_METRICS)}")
        if tie not in TIE_BREAKS:
            raise ValueError(f"train.select_tie {tie!r} is not one of {', '.join(TIE_BREAKS)}")
        self.metric = select_metric
        self.tie = tie
        self.best_epoch: int | None = None
        self.best_score: float = -math.inf
        self.best_loss: float = math.nan
        self.patience = patience
        self.stopped_at: int | None = None  # the evaluated epoch after which train.patience stopped the run

    def update(self, epoch: int, val_metrics: dict[str, float], val_loss: float | None = None) -> bool:
        """Offer one evaluated epoch; True if it becomes the best. ``val_loss`` defaults to ``val_metrics['loss']``."""
        score = score_of(val_metrics, self.metric)
        loss = float(val_metrics.get("loss", math.nan) if val_loss is None else val_loss)
        if self.metric == "last":
            self.best_epoch, self.best_score, self.best_loss = int(epoch), score, loss
            return True
        if math.isnan(score):
            return False
        if self.best_epoch is None or score > self.best_score or (score == self.best_score and self._wins_tie(loss)):
            self.best_epoch, self.best_score, self.best_loss = int(epoch), score, loss
            return True
        return False

    def out_of_patience(self, epoch: int) -> bool:
        """After evaluated epoch ``epoch`` (offered to :meth:`update`): has the score not improved for
        ``patience`` epochs? The first True sets ``stopped_at``; once stopped, always True."""
        if self.stopped_at is None and self.patience is not None and epoch - (-1 if self.best_epoch is None else self.best_epoch) >= self.patience:
            self.stopped_at = int(epoch)
        return self.stopped_at is not None

    def _wins_tie(self, loss: float) -> bool:
        if self.tie == "earlier":
            return False
        if self.tie == "val_loss" and not (math.isnan(loss) or math.isnan(self.best_loss)) and loss != self.best_loss:
            return loss < self.best_loss
        return True  # the later epoch

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "tie": self.tie, "best_epoch": self.best_epoch, "best_score": self.best_score, "best_loss": self.best_loss,
            "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`, or from a checkpoint older than it (best_epoch/best_score only)."""
        self.best_epoch = None if state.get("best_epoch") is None else int(state["best_epoch"])
        self.best_score = float(state.get("best_score", -math.inf))
        self.best_loss = float(state.get("best_loss", math.nan))
        self.stopped_at = None if state.get("stopped_at") is None else int(state["stopped_at"])


def val_split_warnings(n_bags: int, class_counts: Sequence[int], class_names: Sequence[str], min_bags: int = MIN_VAL_BAGS) -> list[str]:
    """Why best-epoch selection on this val split is shaky: too few bags, or classes it lacks."""
    out = []
    if n_bags < min_bags:
        out.append(f"val split has only {n_bags} bags (< {min_bags}): best-epoch selection on it is noisy (AUC saturates early); consider a larger val split "
            f"or train.select_metric=last")
    missing = [name for name, n in zip(class_names, class_counts) if n == 0]
    if missing:
        out.append(f"val split has no bags of class(es) {', '.join(missing)}: their AUC is undefined and left out of the macro average")
    return out


def warn_val_split(n_bags: int, class_counts: Sequence[int], class_names: Sequence[str]) -> list[str]:
    """Log :func:`val_split_warnings` (once per run, on the main rank) and return them."""
    msgs = val_split_warnings(n_bags, class_counts, class_names)
    for m in msgs:
        log.warning(m)
    return msgs
