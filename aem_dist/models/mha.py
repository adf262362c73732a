"""Multi-head attention pooling with a learnable query (Vaswani et al. 2017; the MHA of the AEM/ACMIL code).

h = ReLU(W_r x); one learnable query token q (initialised near 0, so attention starts uniform).
Per head j: s_ij = (W_q q)_j · (W_k h_i)_j / √d, a_j = softmax(s_j) within each bag,
z = LayerNorm(Dropout(W_o [Σ_i a_ij (W_v h_i)_j]_j)), logits = W_c z.

AEM attaches to every head's attention: the per-bag term is the mean over heads of Σ a log a
(``attn_scores`` carries one column per head).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from pydantic import Field

from ..config import ModelConfig
from .abmil import instance_embedding
from .base import MILModel, MILOutput
from .registry import register
from .segment import segment_softmax, segment_sum


class HeadsOptions(ModelConfig):
    n_heads: int = Field(8, ge=1, description="Attention heads (mha; transmil's Nystrom attention). model.hidden must be divisible by it.")


@register("mha", HeadsOptions)
class MHA(MILModel):
    input_linear = "embed.0"

    def __init__(self, cfg: HeadsOptions, in_dim: int, n_classes: int):
        super().__init__()
        if cfg.hidden % cfg.n_heads:
            raise ValueError(f"model.hidden ({cfg.hidden}) must be divisible by model.n_heads ({cfg.n_heads}) for mha")
        self.heads = cfg.n_heads
        self.head_dim = cfg.hidden // cfg.n_heads
        self.embed = instance_embedding(in_dim, cfg)
        self.query = nn.Parameter(torch.randn(1, cfg.hidden) * 1e-6)
        self.q_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.k_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.v_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.out_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.hidden, eps=1e-6)
        self.classifier = nn.Linear(cfg.hidden, n_classes)

    def forward(self, feats: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> MILOutput:
        h = self.embed(feats)  # (T, hidden)
        t = h.shape[0]
        q = self.q_proj(self.query).view(self.heads, self.head_dim)  # (H, d)
        k = self.k_proj(h).view(t, self.heads, self.head_dim)  # (T, H, d)
        v = self.v_proj(h).view(t, self.heads, self.head_dim)  # (T, H, d)
        scores = (k * q).sum(-1) / math.sqrt(self.head_dim)  # (T, H)
        a = segment_softmax(scores, bag_index, n_bags)  # (T, H)
        z = segment_sum(a.unsqueeze(-1) * v, bag_index, n_bags).reshape(n_bags, -1)  # (B, hidden)
        z = self.norm(self.dropout(self.out_proj(z)))
        return MILOutput(logits=self.classifier(z), attn_scores=scores, attn_index=bag_index, n_segments=n_bags, embedding=z)
