"""IBMIL (Lin et al., CVPR 2023): interventional training with a backdoor-adjusted bag classifier.

The ABMIL of the official ``abmil.py`` works on the instance features themselves: scores
s = w₂ᵀ tanh(W₁ x + b₁) + b₂ (D → D → 1), a = softmax(s) within the bag, bag feature M = Σ a x (D).

* Stage 1 (``ibmil_stage: 1``): logits W_c M. Trained as any model; its bag features of the training
  split are then clustered by k-means into the confounder dictionary C (k × D) — see
  :mod:`aem_dist.engine.ibmil`, which runs both stages.
* Stage 2 (``ibmil_stage: 2``, trained from scratch): q = W_q M, keys K = W_k C (both → ``ibmil_confounder_dim``),
  b = softmax_j(K_j·q / √dim) over the k confounders, the confounder feature Σ_j b_j C_j; logits
  W_c [M ; Σ_j b_j C_j] (the official ``confounder_merge='cat'``). C is a fixed buffer (the official
  default ``c_learn`` off). Loss: CE (the official code uses BCE on one logit for two classes; here
  CE over C logits as every model).

AEM attaches to the instance attention a (segments = bags), in both stages.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from pydantic import Field

from ..config import ModelConfig
from .base import MILModel, MILOutput
from .registry import register
from .segment import segment_log_softmax, segment_sum


class IBMILOptions(ModelConfig):
    ibmil_confounders: int = Field(8, ge=1, description="k of the k-means confounder dictionary built from stage-1 bag features (the official example's 8).")
    ibmil_confounder_dim: int = Field(128, ge=1, description="width of the joint space bag queries and confounder keys are projected to (official c_dim 128).")
    ibmil_stage: Literal[1, 2] = Field(2, description="2 = the interventional model (what `model.name=ibmil` trains: stage 1 runs first, see ibmil_stage1); 1 "
        "= the stage-1 base ABMIL alone (set by the pipeline).")
    ibmil_stage1: str | None = Field(None, description="run folder of a finished stage-1 run whose best checkpoint builds the confounders; None = <run "
        "dir>/stage1 (trained first if absent).")


@register("ibmil", IBMILOptions)
class IBMIL(MILModel):
    population_note = "two-stage training: each member needs its own stage-1 run and confounder dictionary"

    def __init__(self, cfg: IBMILOptions, in_dim: int, n_classes: int):
        super().__init__()
        self.stage = cfg.ibmil_stage
        self.attention = nn.Sequential(nn.Linear(in_dim, in_dim), nn.Tanh(), nn.Linear(in_dim, 1))
        if self.stage == 2:
            self.register_buffer("confounders", torch.zeros(cfg.ibmil_confounders, in_dim))
            self.W_q = nn.Linear(in_dim, cfg.ibmil_confounder_dim)
            self.W_k = nn.Linear(in_dim, cfg.ibmil_confounder_dim)
            self.classifier = nn.Linear(2 * in_dim, n_classes)
        else:
            self.classifier = nn.Linear(in_dim, n_classes)
        self._checked = False

    def forward(self, feats: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> MILOutput:
        s = self.attention(feats)  # (T, 1)
        log_a = segment_log_softmax(s, bag_index, n_bags)
        m = segment_sum(torch.exp(log_a) * feats, bag_index, n_bags)  # (B, D)
        z = m
        if self.stage == 2:
            if self.training and not self._checked:
                if not bool(self.confounders.abs().sum() > 0):
                    raise RuntimeError("ibmil (stage 2) has no confounder dictionary: train it with `aem-dist train` or engine.local.run_local "
                                       "with a run folder, which runs stage 1 first")
                self._checked = True
            q = self.W_q(m)  # (B, c)
            k = self.W_k(self.confounders)  # (K, c)
            b = torch.softmax(q @ k.t() / math.sqrt(k.shape[1]), dim=1)  # (B, K)
            z = torch.cat([m, b @ self.confounders], dim=1)  # (B, 2D)
        return MILOutput(logits=self.classifier(z), attn_scores=s, attn_index=bag_index, n_segments=n_bags, attn_log=log_a, extras={"bag_feature": m})
