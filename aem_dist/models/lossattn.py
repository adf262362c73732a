"""LossAttn (Shi et al., AAAI 2020): attention derived from the instance losses of the bag classifier.

h = Dropout(ReLU(W_r x)). The bag classifier W, b is applied to every instance: c_i = W h_i + b (T, C).
The attention score of an instance is log Σ_c exp(c_ic) (the official code takes exp of the instance
logits, sums over classes and normalises over the bag), so a = softmax(s) within each bag;
z = Σ a_i h_i (the official ``mean(N · a_i h_i)``), bag logits W z + b.

Loss (the official MIL ``main.py``): CE(bag) + w · (1/N) Σ_i a_i · CE(c_i, y) — every instance takes
the bag's label, its cross-entropy weighted by its (not detached) attention, averaged over the bag's
N instances; w = ``lossattn_weight`` (2.0). Named ``ce`` and ``instance`` (weight applied), each a
mean over bags. AEM attaches to a (the scores above), segments = bags.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from pydantic import Field

from ..config import ModelConfig
from .abmil import instance_embedding
from .base import MILModel, MILOutput
from .registry import register
from .segment import segment_log_softmax, segment_mean, segment_sum


class LossAttnOptions(ModelConfig):
    lossattn_weight: float = Field(2.0, ge=0.0, description="Weight of lossattn's attention-weighted instance cross-entropy (the official code's 2.0).")


@register("lossattn", LossAttnOptions)
class LossAttn(MILModel):
    input_linear = "embed.0"

    def __init__(self, cfg: LossAttnOptions, in_dim: int, n_classes: int):
        super().__init__()
        self.weight = cfg.lossattn_weight
        self.embed = instance_embedding(in_dim, cfg)
        self.classifier = nn.Linear(cfg.hidden, n_classes)

    def forward(self, feats: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> MILOutput:
        h = self.embed(feats)  # (T, hidden)
        inst_logits = self.classifier(h)  # (T, C)
        scores = torch.logsumexp(inst_logits, dim=1, keepdim=True)  # (T, 1)
        log_a = segment_log_softmax(scores, bag_index, n_bags)
        z = segment_sum(torch.exp(log_a) * h, bag_index, n_bags)  # (B, hidden)
        return MILOutput(
            logits=self.classifier(z),
            attn_scores=scores,
            attn_index=bag_index,
            n_segments=n_bags,
            attn_log=log_a,
            embedding=z,
            extras={"instance_logits": inst_logits, "bag_index": bag_index},
        )

    def loss_terms(self, out: MILOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        bag_index = out.extras["bag_index"]
        inst_ce = F.cross_entropy(out.extras["instance_logits"], labels[bag_index], reduction="none")  # (T,)
        a = torch.exp(out.attn_log[:, 0])  # (T,)
        per_bag = segment_mean(a * inst_ce, bag_index, labels.shape[0])  # (B,)
        return {"ce": self.bag_ce(out.logits, labels), "instance": self.weight * per_bag.mean()}
