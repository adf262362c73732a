"""Gated-attention ABMIL (Ilse et al. 2018) on packed bags — the paper's base model.

h = ReLU(W_r x) (D → hidden, no bias as in the paper's code), s = wᵀ(tanh(V h) ⊙ σ(U h)),
a = softmax(s) within each bag, z = Σ a h, logits = W_c z.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .base import MILModel, MILOutput
from .registry import register
from .segment import segment_log_softmax, segment_sum


class GatedAttention(nn.Module):
    """Gated attention scores: (T, hidden) → (T, heads)."""

    def __init__(self, dim: int, hidden: int, heads: int = 1):
        super().__init__()
        self.V = nn.Linear(dim, hidden)
        self.U = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, heads)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h)))


def instance_embedding(in_dim: int, cfg: ModelConfig) -> nn.Sequential:
    """The instance encoder the paper's models share: Linear → ReLU → Dropout (left out when 0)."""
    dropout = [nn.Dropout(cfg.dropout)] if cfg.dropout > 0 else []
    return nn.Sequential(nn.Linear(in_dim, cfg.hidden, bias=cfg.bias), nn.ReLU(), *dropout)


@register("abmil")
class ABMIL(MILModel):
    input_linear = "embed.0"

    def __init__(self, cfg: ModelConfig, in_dim: int, n_classes: int):
        super().__init__()
        self.embed = instance_embedding(in_dim, cfg)
        self.attention = GatedAttention(cfg.hidden, cfg.attn_hidden or cfg.hidden, heads=1)
        self.classifier = nn.Linear(cfg.hidden, n_classes)

    def forward(self, feats: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> MILOutput:
        h = self.embed(feats)  # (T, hidden)
        scores = self.attention(h)  # (T, 1)
        log_a = segment_log_softmax(scores, bag_index, n_bags)  # (T, 1), reused by the AEM term
        z = segment_sum(torch.exp(log_a) * h, bag_index, n_bags)  # (B, hidden)
        return MILOutput(logits=self.classifier(z), attn_scores=scores, attn_index=bag_index, n_segments=n_bags, attn_log=log_a, embedding=z)
