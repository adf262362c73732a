"""The contract every MIL model fulfils on packed batches.

``forward(feats, bag_index, n_bags)`` returns a :class:`MILOutput`:

* ``logits`` — ``(B, C)`` one row per bag;
* the attention the AEM term regularises, as pre-softmax scores ``attn_scores`` ``(R, H)`` — R rows
  (usually one per instance), H heads/branches/classes — with ``attn_index`` ``(R,)`` naming each row's
  softmax segment. Usually segments are bags; a model that attends within sub-bags (DTFD's pseudo-bags)
  sets ``segment_bag`` ``(S,)`` to map segments to bags and ``attn_rows`` ``(R,)`` to the packed
  instance each row belongs to. Attention-free models (mean/max pooling) leave the scores ``None``;
  their AEM term is 0.
* ``extras`` — tensors a model's own loss terms need (instance logits, branch logits...).
* ``embedding`` — ``(B, hidden)`` the pooled bag embedding the classifier reads (ABMIL's ``z``), where a
  model has one obvious such vector; None elsewhere. ``predict`` keeps it (the report's Fig. 11 UMAP).

``loss_terms(out, labels)`` returns the model's own named loss terms, each already a mean over the
batch's bags (so a packed batch's gradient is the mean of its bags' gradients). The engine adds
``aem`` (from :mod:`aem_dist.losses`) with weight λ and every other term with weight 1.
Models import neither Ray nor torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .segment import segment_log_softmax, segment_sum


@dataclass
class MILOutput:
    logits: torch.Tensor  # (B, C)
    attn_scores: torch.Tensor | None = None  # (R, H)
    attn_index: torch.Tensor | None = None  # (R,) segment of each row
    n_segments: int = 0
    segment_bag: torch.Tensor | None = None  # (S,) bag of each segment; None = segments are bags
    attn_rows: torch.Tensor | None = None  # (R,) packed instance of each row; None = row i is instance i
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    attn_log: torch.Tensor | None = None  # (R, H) the log-softmax of attn_scores, if the model computed it
    embedding: torch.Tensor | None = None  # (B, hidden) pooled bag embedding z, where the model has one

    def log_attention(self) -> torch.Tensor:
        """(R, H): log of the attention weights, softmax within each segment."""
        if self.attn_log is not None:
            return self.attn_log
        if self.attn_scores is None or self.attn_index is None:
            raise ValueError("this model has no attention")
        return segment_log_softmax(self.attn_scores, self.attn_index, self.n_segments)

    def instance_attention(self, bag_index: torch.Tensor, n_bags: int) -> torch.Tensor | None:
        """(T,): one attention weight per packed instance, summing to 1 within each bag.

        Mean over heads; where segments are sub-bags each instance's weight is divided among the
        bag's segments so that the bag sums to 1. None for attention-free models.
        """
        if self.attn_scores is None:
            return None
        a = torch.exp(self.log_attention()).mean(dim=1)  # (R,)
        rows = self.attn_rows if self.attn_rows is not None else torch.arange(a.shape[0], device=a.device)
        per_instance = a.new_zeros(bag_index.shape[0]).index_add(0, rows, a)  # out of place: vmap-friendly (populations)
        bag_total = segment_sum(per_instance, bag_index, n_bags)  # (B,)
        return per_instance / bag_total.clamp_min(torch.finfo(a.dtype).tiny)[bag_index]


class MILModel(nn.Module):
    """Base class: subclasses implement ``forward``; override ``loss_terms`` for extra terms.

    ``population_note``: None when the model can train as one member of a population (stacked
    weights, :mod:`aem_dist.engine.population`); otherwise the one-line reason it cannot, and sweeps
    run it one trial per grid point.
    """

    population_note: str | None = None
    # train.class_weights resolved per class (set by the engine before training); None: plain cross-entropy.
    class_weights: tuple[float, ...] | None = None
    # The Linear that alone reads ``feats`` (the instance embedding's first layer), if the model has one:
    # a population then computes it for all members as ONE matmul over the shared input.
    input_linear: str | None = None

    def forward(self, feats: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> MILOutput:  # pragma: no cover
        raise NotImplementedError

    def loss_terms(self, out: MILOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named loss terms, each a mean over bags. Default: cross-entropy of the bag logits."""
        return {"ce": self.bag_ce(out.logits, labels)}

    def bag_ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of bag-level predictions ``logits`` (R, C) against slide labels (R,). With
        ``class_weights`` each row's cross-entropy is multiplied by its class's weight before the plain
        mean (torch's ``weight=`` would divide by Σw instead, which undoes a one-bag batch's weight)."""
        if self.class_weights is None:
            return F.cross_entropy(logits, labels)
        return self.bag_mean(F.cross_entropy(logits, labels, reduction="none"), labels)

    def bag_mean(self, per_row: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(R,) values of slide-label terms → their mean, each weighted by its class (``class_weights``)."""
        if self.class_weights is None:
            return per_row.mean()
        w = torch.tensor(self.class_weights, dtype=per_row.dtype, device=per_row.device)  # (C,)
        return (per_row * w[labels]).mean()

    def after_step(self, progress: float) -> None:
        """Called by the training loop right after every optimizer step, with ``progress`` = the share of
        the run's optimizer steps done so far (step / total, in (0, 1]). Default: nothing. Models with
        state that follows the weights (MHIM-MIL's EMA teacher) update it here; such state lives in
        buffers so that it is part of the checkpoint and a resumed run continues exactly."""
