"""ACMIL (Zhang et al. 2024): multiple-branch attention (MBA) with stochastic top-K instance masking.

h = ReLU(W_r x); one gated-attention network with K outputs gives K branch scores per instance.
Training only (STKIM): in every (bag, branch) the min(top_k, n) highest-scoring instances are
candidates and ⌊min(top_k, n)·mask_prob⌋ of them, chosen at random (torch's global RNG), are removed
from that branch's softmax — at most n − 1, so a branch never loses its whole bag. Nothing else is
ever removed, and evaluation masks nothing. Branch k: a_k = softmax over the kept instances,
z_k = Σ a_ik h_i, branch logits W_k z_k. Slide: z = mean_k z_k (= Σ_i mean_k a_ik h_i), logits W_s z.

Loss (ACMIL's): CE(slide) + mean_k CE(branch k) + diversity, where diversity is the mean over branch
pairs of the cosine similarity of their attention vectors over the bag (masked instances weigh 0).
With one branch only the slide CE remains, as in the official code.

Layout: each (bag, branch) is its own attention segment (``attn_index = bag·K + k``, rows are the
kept (instance, branch) pairs, ``attn_rows`` the instance of each row, ``segment_bag`` the bag), so
masked instances are simply absent. AEM attaches to every branch: per bag the mean over its K
branch segments of Σ a log a.
"""

from __future__ import annotations

import torch
from torch import nn
from pydantic import Field

from ..config import ModelConfig
from .abmil import GatedAttention, instance_embedding
from .base import MILModel, MILOutput
from .registry import register
from .segment import segment_count, segment_rank, segment_softmax, segment_sum


def stkim_keep(scores: torch.Tensor, bag_index: torch.Tensor, n_bags: int, top_k: int, prob: float) -> torch.Tensor:
    """(T, K) scores → (T, K) bool, False where an instance is masked out of a branch.

    Per (bag, branch): ⌊min(top_k, n)·prob⌋ (at most n − 1) of the min(top_k, n) top-scoring
    instances, drawn uniformly with ``torch.rand`` (the global RNG).
    """
    n = segment_count(bag_index, n_bags)  # (B,)
    k_eff = n.clamp(max=top_k)  # (B,)
    # the small epsilon keeps e.g. 10·0.6 = 6.000…01 and 10·0.7 from landing one below after rounding error
    n_mask = torch.minimum(torch.floor(k_eff.double() * prob + 1e-9).long(), n - 1)  # (B,)
    rank = segment_rank(scores, bag_index, n_bags)  # (T, K)
    in_top = rank < k_eff[bag_index].unsqueeze(1)
    draw = torch.rand(scores.shape, device=scores.device, dtype=torch.float64)
    key = torch.where(in_top, draw, torch.full_like(draw, -1.0))  # non-candidates rank last
    picked = segment_rank(key, bag_index, n_bags) < n_mask[bag_index].unsqueeze(1)
    return ~(in_top & picked)


class ACMILOptions(ModelConfig):
    n_branches: int = Field(5, ge=1, description="Attention branches (acmil).")
    mask_top_k: int = Field(10, ge=0, description="Top-attended instances considered for random masking (acmil, training only).")
    mask_prob: float = Field(0.6, ge=0.0, le=1.0, description="Share of the top-k instances masked at random in each branch: floor(k·p) of them, so each is "
        "masked with probability ~p (acmil, training only).")


@register("acmil", ACMILOptions)
class ACMIL(MILModel):
    input_linear = "embed.0"

    def __init__(self, cfg: ACMILOptions, in_dim: int, n_classes: int):
        super().__init__()
        self.branches = cfg.n_branches
        self.top_k = cfg.mask_top_k
        self.mask_prob = cfg.mask_prob
        self.embed = instance_embedding(in_dim, cfg)
        self.attention = GatedAttention(cfg.hidden, cfg.attn_hidden or cfg.hidden, heads=cfg.n_branches)
        # With one branch the loss is the slide CE alone (as in the official code), so a branch
        # classifier would be a parameter no loss reaches — DDP's reducer fails on those.
        self.branch_classifiers = nn.ModuleList(nn.Linear(cfg.hidden, n_classes) for _ in range(cfg.n_branches if cfg.n_branches > 1 else 0))
        self.slide_classifier = nn.Linear(cfg.hidden, n_classes)

    def forward(self, feats: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> MILOutput:
        h = self.embed(feats)  # (T, hidden)
        s = self.attention(h)  # (T, K)
        k = self.branches
        if self.training and self.top_k > 0 and self.mask_prob > 0:
            keep = stkim_keep(s.detach(), bag_index, n_bags, self.top_k, self.mask_prob)
        else:
            keep = torch.ones_like(s, dtype=torch.bool)
        rows, branch = keep.nonzero(as_tuple=True)  # (R,) kept (instance, branch) pairs
        seg = bag_index[rows] * k + branch  # (R,) segment = (bag, branch)
        scores = s[rows, branch].unsqueeze(1)  # (R, 1)
        a = segment_softmax(scores, seg, n_bags * k)  # (R, 1)
        z = segment_sum(a * h[rows], seg, n_bags * k).view(n_bags, k, -1)  # (B, K, hidden)
        branch_logits = torch.stack([clf(z[:, j]) for j, clf in enumerate(self.branch_classifiers)], dim=1) if k > 1 else None  # (B, K, C)
        logits = self.slide_classifier(z.mean(dim=1))  # (B, C)
        dense = torch.zeros_like(s).index_put((rows, branch), a.squeeze(1))  # (T, K) attention, 0 where masked
        return MILOutput(
            logits=logits,
            attn_scores=scores,
            attn_index=seg,
            n_segments=n_bags * k,
            segment_bag=torch.arange(n_bags * k, device=feats.device) // k,
            attn_rows=rows,
            extras={"branch_logits": branch_logits, "attention": dense, "bag_index": bag_index},
        )

    def loss_terms(self, out: MILOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {"ce": self.bag_ce(out.logits, labels)}
        k = self.branches
        if k > 1:
            bl = out.extras["branch_logits"]  # (B, K, C)
            terms["ce_branch"] = self.bag_ce(bl.flatten(0, 1), labels.repeat_interleave(k))
            terms["diversity"] = branch_diversity(out.extras["attention"], out.extras["bag_index"], labels.shape[0]).mean()
        return terms


def branch_diversity(attention: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> torch.Tensor:
    """(T, K) attention → (B,): mean over branch pairs i < j of cos(a_i, a_j) within each bag."""
    k = attention.shape[1]
    gram = segment_sum(attention.unsqueeze(2) * attention.unsqueeze(1), bag_index, n_bags)  # (B, K, K)
    norm = torch.sqrt(torch.diagonal(gram, dim1=1, dim2=2))  # (B, K)
    cos = gram / (norm.unsqueeze(2) * norm.unsqueeze(1)).clamp_min(1e-8)  # torch's cosine_similarity eps
    i, j = torch.triu_indices(k, k, offset=1, device=attention.device)
    return cos[:, i, j].mean(dim=1)
