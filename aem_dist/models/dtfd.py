"""DTFD-MIL (Zhang et al. 2022): double-tier feature distillation with pseudo-bags, MaxMinS selection.

h = ReLU(W_r x). Each bag's instances are split into m = min(n_pseudo_bags, n) pseudo-bags whose sizes
differ by at most one: at random in training (torch's global RNG; a fresh split every step), and
deterministically (round-robin by instance order) in evaluation so that predictions are reproducible.

Tier 1: gated attention within each pseudo-bag, a = softmax(s) over the pseudo-bag, z_p = Σ a_i h_i,
pseudo-bag logits W_1 z_p (each pseudo-bag inherits its bag's label).
Distillation (MaxMinS): instance CAM logits W_1 (a_i h_i) (no bias); the instance score is the softmax
probability of the last class (the positive class in binary tasks, as in the reference code); from
every pseudo-bag the highest- and lowest-scoring instances' h are kept (the same one twice for a
one-instance pseudo-bag).
Tier 2: gated attention over the bag's 2m distilled instances, logits W_2 z.

Loss: CE(tier 2) + CE(tier 1) averaged over each bag's pseudo-bags (``ce`` and ``ce_tier1``). The
distilled features enter tier 2 detached: the reference code steps tier 1 on its own loss before tier
2's loss is back-propagated, so tier 2's loss never updates tier 1.

AEM attaches to tier-1 attention: every pseudo-bag is an attention segment (``segment_bag`` maps it
to its bag); the per-bag term is the mean over the bag's pseudo-bags of Σ a log a.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from pydantic import Field

from ..config import ModelConfig
from .abmil import GatedAttention, instance_embedding
from .base import MILModel, MILOutput
from .registry import register
from .segment import segment_count, segment_mean, segment_rank, segment_softmax, segment_sum


def pseudo_bags(bag_index: torch.Tensor, n_bags: int, n_pseudo: int, random: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Split every bag into min(n_pseudo, n) pseudo-bags of sizes differing by at most one.

    Returns ``segment`` (T,) — each instance's pseudo-bag, numbered bag by bag — and ``segment_bag``
    (S,). ``random`` draws the assignment with ``torch.rand``; otherwise it is round-robin by row order.
    """
    t = bag_index.shape[0]
    n = segment_count(bag_index, n_bags)  # (B,)
    m = n.clamp(max=n_pseudo)  # (B,)
    order_key = torch.rand(t, device=bag_index.device) if random else -torch.arange(t, device=bag_index.device)
    pos = segment_rank(order_key, bag_index, n_bags)  # (T,) a permutation of 0..n-1 within each bag
    first = torch.cumsum(m, 0) - m  # (B,) first pseudo-bag id of each bag
    segment = first[bag_index] + pos % m[bag_index]
    segment_bag = torch.repeat_interleave(torch.arange(n_bags, device=bag_index.device), m)
    return segment, segment_bag


class DTFDOptions(ModelConfig):
    n_pseudo_bags: int = Field(4, ge=1, description="Pseudo-bags per bag (dtfd).")


@register("dtfd", DTFDOptions)
class DTFD(MILModel):
    input_linear = "embed.0"

    def __init__(self, cfg: DTFDOptions, in_dim: int, n_classes: int):
        super().__init__()
        attn_hidden = cfg.attn_hidden or cfg.hidden
        self.n_pseudo = cfg.n_pseudo_bags
        self.embed = instance_embedding(in_dim, cfg)
        self.attention1 = GatedAttention(cfg.hidden, attn_hidden, heads=1)
        self.classifier1 = nn.Linear(cfg.hidden, n_classes)
        self.attention2 = GatedAttention(cfg.hidden, attn_hidden, heads=1)
        self.classifier2 = nn.Linear(cfg.hidden, n_classes)

    def forward(self, feats: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> MILOutput:
        h = self.embed(feats)  # (T, hidden)
        seg, seg_bag = pseudo_bags(bag_index, n_bags, self.n_pseudo, random=self.training)
        n_seg = int(seg_bag.shape[0])
        # tier 1: ABMIL within every pseudo-bag
        s1 = self.attention1(h)  # (T, 1)
        weighted = segment_softmax(s1, seg, n_seg) * h  # (T, hidden)
        tier1_logits = self.classifier1(segment_sum(weighted, seg, n_seg))  # (S, C)
        # MaxMinS distillation: rank instances by their CAM probability of the last class
        cam = weighted @ self.classifier1.weight.t()  # (T, C)
        score = torch.softmax(cam.detach(), dim=1)[:, -1]  # (T,)
        rank = segment_rank(score, seg, n_seg)
        top = (rank == 0).nonzero().squeeze(1)
        bottom = (rank == segment_count(seg, n_seg)[seg] - 1).nonzero().squeeze(1)
        chosen = torch.cat([top, bottom])  # (2S,)
        # tier 2: ABMIL over the distilled instances of each bag (detached, see module docstring)
        g = h[chosen].detach()
        g_bag = bag_index[chosen]
        a2 = segment_softmax(self.attention2(g), g_bag, n_bags)
        logits = self.classifier2(segment_sum(a2 * g, g_bag, n_bags))  # (B, C)
        return MILOutput(
            logits=logits,
            attn_scores=s1,
            attn_index=seg,
            n_segments=n_seg,
            segment_bag=seg_bag,
            extras={"tier1_logits": tier1_logits, "segment_bag": seg_bag},
        )

    def loss_terms(self, out: MILOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        seg_bag = out.extras["segment_bag"]
        per_pseudo = F.cross_entropy(out.extras["tier1_logits"], labels[seg_bag], reduction="none")  # (S,)
        return {
            "ce": self.bag_ce(out.logits, labels),
            "ce_tier1": self.bag_mean(segment_mean(per_pseudo, seg_bag, labels.shape[0]), labels),
        }
