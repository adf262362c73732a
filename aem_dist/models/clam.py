"""CLAM-SB (Lu et al. 2021): single-branch gated attention plus instance-level clustering.

h = ReLU(W_r x); s = gated attention (as ABMIL), a = softmax(s) within each bag, z = Σ a h,
logits = W_c z. One instance classifier per class (hidden → 2, packed here as one hidden → 2C layer).

Instance loss per bag (CLAM's ``inst_eval``): the k highest- and k lowest-attended instances,
k = min(k_sample, ⌊n/2⌋), are pseudo-labelled 1 and 0 for the classifier of the bag's class; CE over
those 2k instances. With more than two classes (CLAM's subtyping setting) every other class's
classifier also sees the bag's top-k instances as 0 (``inst_eval_out``), and the per-class sum is
divided by the number of classes. A bag with one instance has no instance loss (CLAM itself would
fail on it).

Loss: bag_weight·CE + (1 − bag_weight)·instance (CLAM default 0.7/0.3), returned as ``ce`` and
``instance`` with the weights already applied, each a mean over bags.
AEM attaches to the attention, exactly as in ABMIL.
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
from .segment import segment_count, segment_rank, segment_softmax, segment_sum


class CLAMOptions(ModelConfig):
    k_sample: int = Field(8, ge=1, description="Instances sampled from each end of the attention ranking for the instance-level clustering loss (clam_sb; "
        "CLAM's B).")
    bag_weight: float = Field(0.7, ge=0.0, le=1.0, description="Weight of the bag cross-entropy in clam_sb's loss; the instance loss gets 1 - bag_weight "
        "(CLAM's default 0.7).")


@register("clam_sb", CLAMOptions)
class CLAMSB(MILModel):
    input_linear = "embed.0"

    def __init__(self, cfg: CLAMOptions, in_dim: int, n_classes: int):
        super().__init__()
        self.n_classes = n_classes
        self.k_sample = cfg.k_sample
        self.bag_weight = cfg.bag_weight
        self.subtyping = n_classes > 2
        self.embed = instance_embedding(in_dim, cfg)
        self.attention = GatedAttention(cfg.hidden, cfg.attn_hidden or cfg.hidden, heads=1)
        self.classifier = nn.Linear(cfg.hidden, n_classes)
        self.instance_classifiers = nn.Linear(cfg.hidden, 2 * n_classes)

    def forward(self, feats: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> MILOutput:
        h = self.embed(feats)  # (T, hidden)
        scores = self.attention(h)  # (T, 1)
        a = segment_softmax(scores, bag_index, n_bags)
        z = segment_sum(a * h, bag_index, n_bags)  # (B, hidden)
        logits = self.classifier(z)
        inst = self.instance_classifiers(h).view(-1, self.n_classes, 2)  # (T, C, 2)
        return MILOutput(
            logits=logits,
            attn_scores=scores,
            attn_index=bag_index,
            n_segments=n_bags,
            embedding=z,
            extras={"instance_logits": inst, "bag_index": bag_index},
        )

    def loss_terms(self, out: MILOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        extras = out.extras
        inst_loss = clam_instance_loss(out.attn_scores[:, 0].detach(), extras["instance_logits"], extras["bag_index"], labels, self.k_sample, self.subtyping)
        return {
            "ce": self.bag_weight * self.bag_ce(out.logits, labels),
            "instance": (1.0 - self.bag_weight) * inst_loss.mean(),
        }


def clam_instance_loss(
    scores: torch.Tensor, inst_logits: torch.Tensor, bag_index: torch.Tensor, labels: torch.Tensor, k_sample: int, subtyping: bool
) -> torch.Tensor:
    """(B,) CLAM instance-clustering loss per bag from attention ``scores`` (T,), ``inst_logits`` (T, C, 2)."""
    n_bags, n_classes = labels.shape[0], inst_logits.shape[1]
    n = segment_count(bag_index, n_bags)  # (B,)
    k = torch.clamp(n // 2, max=k_sample)  # (B,) 0 for a one-instance bag
    rank = segment_rank(scores, bag_index, n_bags)  # (T,) 0 = most attended
    k_row = k[bag_index]
    top = rank < k_row
    bottom = rank >= n[bag_index] - k_row
    y_row = labels[bag_index]
    rows = torch.arange(scores.shape[0], device=scores.device)
    # in-class: top-k → 1, bottom-k → 0, with the classifier of the bag's class
    chosen = top | bottom
    ce_in = F.cross_entropy(inst_logits[rows, y_row][chosen], top[chosen].long(), reduction="none")
    per_bag = segment_sum(ce_in, bag_index[chosen], n_bags) / (2 * k).clamp(min=1)
    if subtyping:
        # out-of-class: top-k → 0 for every other class's classifier
        logits_top = inst_logits[top]  # (R, C, 2)
        zeros = torch.zeros(logits_top.shape[0] * n_classes, dtype=torch.long, device=scores.device)
        ce_out = F.cross_entropy(logits_top.flatten(0, 1), zeros, reduction="none").view(-1, n_classes)
        other = torch.ones_like(ce_out, dtype=torch.bool)
        other[torch.arange(ce_out.shape[0], device=scores.device), y_row[top]] = False
        per_bag = per_bag + segment_sum((ce_out * other).sum(1), bag_index[top], n_bags) / k.clamp(min=1)
        per_bag = per_bag / n_classes
    return per_bag
