"""Max- and mean-pooling baselines (Table 2 of the paper; the MaxMIL/MeanMIL heads of the ACMIL code).

h = ReLU(W_r x); every instance gets class logits c_i = W_c h_i; the bag logits are max_i c_i
(per class) or mean_i c_i (= W_c · mean_i h_i). They have no attention, so ``attn_scores`` is None
and the AEM term is 0: λ changes nothing for them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .abmil import instance_embedding
from .base import MILModel, MILOutput
from .registry import register
from .segment import segment_max, segment_mean


class _InstancePooling(MILModel):
    input_linear = "embed.0"

    reduce = staticmethod(segment_mean)

    def __init__(self, cfg: ModelConfig, in_dim: int, n_classes: int):
        super().__init__()
        self.embed = instance_embedding(in_dim, cfg)
        self.classifier = nn.Linear(cfg.hidden, n_classes)

    def forward(self, feats: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> MILOutput:
        instance_logits = self.classifier(self.embed(feats))  # (T, C)
        return MILOutput(logits=self.reduce(instance_logits, bag_index, n_bags), extras={"instance_logits": instance_logits})


@register("maxpool")
class MaxPool(_InstancePooling):
    reduce = staticmethod(segment_max)


@register("meanpool")
class MeanPool(_InstancePooling):
    reduce = staticmethod(segment_mean)
