"""DSMIL (Li, Li & Eliceiri 2021): an instance stream and a critical-instance attention stream.

h = ReLU(W_r x) (the shared instance embedding stands in for DSMIL's feature extractor).
Instance stream: c_i = W_i h_i (C scores per instance); its bag score is max_i c_i per class.
Bag stream: for each class k the critical instance m_k = argmax_i c_ik; queries
Q(h) = tanh(W_2 ReLU(W_1 h)); attention s_ik = Q(h_i)·Q(h_{m_k}) / √d, a_k = softmax(s_k) within the
bag; b_k = Σ_i a_ik h_i (V is the identity, DSMIL's default); bag logits = Conv1d(C, C, kernel=hidden)
over [b_1 … b_C], i.e. a linear map of the flattened (C × hidden) matrix.

Loss (DSMIL's): 0.5·CE(max instance scores) + 0.5·CE(bag logits), returned as ``ce_max`` and
``ce``. Prediction, as in the AEM code's evaluation, averages the two streams' probabilities;
``logits`` is the log of that average, so ``softmax(logits)`` gives it back.

AEM attaches to the bag stream's attention: one column per class, mean over classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .abmil import instance_embedding
from .base import MILModel, MILOutput
from .registry import register
from .segment import segment_argmax, segment_max, segment_softmax, segment_sum


@register("dsmil")
class DSMIL(MILModel):
    input_linear = "embed.0"

    def __init__(self, cfg: ModelConfig, in_dim: int, n_classes: int):
        super().__init__()
        q_dim = cfg.attn_hidden or cfg.hidden
        self.q_dim = q_dim
        self.n_classes = n_classes
        self.embed = instance_embedding(in_dim, cfg)
        self.instance_classifier = nn.Linear(cfg.hidden, n_classes)
        self.query = nn.Sequential(nn.Linear(cfg.hidden, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh())
        self.bag_classifier = nn.Linear(n_classes * cfg.hidden, n_classes)  # = Conv1d(C, C, kernel_size=hidden)

    def forward(self, feats: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> MILOutput:
        h = self.embed(feats)  # (T, hidden)
        c = self.instance_classifier(h)  # (T, C)
        max_logits = segment_max(c, bag_index, n_bags)  # (B, C)
        critical = segment_argmax(c.detach(), bag_index, n_bags)  # (B, C) row of each class's critical instance
        q = self.query(h)  # (T, q)
        q_crit = q[critical]  # (B, C, q)
        # One class at a time keeps memory at (T, q) and (T, hidden) instead of (T, C, q) and (T, C, hidden).
        scores = torch.stack([(q * q_crit[bag_index, k]).sum(-1) for k in range(self.n_classes)], dim=1) / math.sqrt(self.q_dim)  # (T, C)
        a = segment_softmax(scores, bag_index, n_bags)  # (T, C)
        b = torch.stack([segment_sum(a[:, k : k + 1] * h, bag_index, n_bags) for k in range(self.n_classes)], dim=1)  # (B, C, hidden)
        bag_logits = self.bag_classifier(b.flatten(1))  # (B, C)
        mixed = torch.logaddexp(F.log_softmax(bag_logits, dim=1), F.log_softmax(max_logits, dim=1)) - math.log(2.0)
        return MILOutput(
            logits=mixed,
            attn_scores=scores,
            attn_index=bag_index,
            n_segments=n_bags,
            extras={"bag_logits": bag_logits, "max_logits": max_logits, "instance_logits": c},
        )

    def loss_terms(self, out: MILOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "ce": 0.5 * self.bag_ce(out.extras["bag_logits"], labels),
            "ce_max": 0.5 * self.bag_ce(out.extras["max_logits"], labels),
        }
