"""ILRA-MIL (Xiang & Zhang, ICLR 2023): low-rank latent vectors, gated attention blocks, non-local pooling.

Per bag X (N, D), as the official ``models/ilra.py``:

* an attention block ``MAB(Q, K)``: Q' = fc_q(Q), K' = fc_k(K), V' = fc_v(K); A = multi-head attention
  (torch's ``nn.MultiheadAttention``: input projections with bias, ``heads`` heads, output projection)
  of Q' over K', V'; O = LN0(Q' + A); O = LN1(O + ReLU(fc_o(O))); gated blocks multiply by
  SiLU(gate(Q)) (the raw query).
* a GAB: H = MAB_fwd(L, X) — r learnable latent vectors L (the low-rank matrix, r = ``ilra_rank``)
  attend over the bag's instances; X̂ = MAB_bwd(X, H) — every instance attends over the r latents.
  ``ilra_layers`` GABs are stacked (D → hidden, then hidden → hidden).
* non-local pooling: one learnable seed S attends over the instances, MAB(S, X̂) (ungated), then the
  classifier. Loss: CE.

Packed: attention over instances is a segment softmax per bag; attention over the r latents is a
plain softmax per instance over its own bag's latents. AEM attaches to the pooling attention (the
instance attention that forms the bag vector): ``(T, heads)``, segments = bags, mean over heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from pydantic import Field

from .base import MILModel, MILOutput
from .mha import HeadsOptions
from .registry import register
from .segment import segment_log_softmax, segment_sum


class MAB(nn.Module):
    """ILRA's multi-head attention block, for packed bags.

    ``pool``: per-bag queries (Q, dim_q) attend over the packed instances → (B, Q, dim).
    ``spread``: every packed instance attends over its bag's keys (B, R, dim_k) → (T, dim).
    """

    def __init__(self, dim_q: int, dim_k: int, dim: int, heads: int, ln: bool, gated: bool):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.hidden ({dim}) must be divisible by model.n_heads ({heads})")
        self.heads, self.head_dim = heads, dim // heads
        self.fc_q = nn.Linear(dim_q, dim)
        self.fc_k = nn.Linear(dim_k, dim)
        self.fc_v = nn.Linear(dim_k, dim)
        # nn.MultiheadAttention's own parameters and init: packed in-projection (xavier-uniform, zero
        # bias) and the output projection
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        nn.init.xavier_uniform_(self.in_proj_weight)
        self.out_proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.out_proj.bias)
        self.ln0 = nn.LayerNorm(dim) if ln else nn.Identity()
        self.ln1 = nn.LayerNorm(dim) if ln else nn.Identity()
        self.fc_o = nn.Linear(dim, dim)
        self.gate = nn.Sequential(nn.Linear(dim_q, dim), nn.SiLU()) if gated else None

    def _project(self, x: torch.Tensor, part: int) -> torch.Tensor:
        d = self.in_proj_weight.shape[1]
        y = F.linear(x, self.in_proj_weight[part * d : (part + 1) * d], self.in_proj_bias[part * d : (part + 1) * d])
        return y.view(*x.shape[:-1], self.heads, self.head_dim)

    def _finish(self, qp: torch.Tensor, attended: torch.Tensor, q_raw: torch.Tensor) -> torch.Tensor:
        o = self.ln0(qp + self.out_proj(attended))
        o = self.ln1(o + F.relu(self.fc_o(o)))
        return o * self.gate(q_raw) if self.gate is not None else o

    def pool(self, queries: torch.Tensor, x: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (Q, dim_q), x (T, dim_k) → (B, Q, dim) and the log-attention (T, Q, heads)."""
        qp = self.fc_q(queries)  # (Q, dim)
        q = self._project(qp, 0)  # (Q, h, dh)
        k = self._project(self.fc_k(x), 1)  # (T, h, dh)
        v = self._project(self.fc_v(x), 2)  # (T, h, dh)
        scores = torch.einsum("thd,qhd->tqh", k, q) / math.sqrt(self.head_dim)  # (T, Q, h)
        t, nq, h = scores.shape
        log_a = segment_log_softmax(scores.reshape(t, nq * h), bag_index, n_bags).view(t, nq, h)
        attended = segment_sum(torch.exp(log_a).unsqueeze(3) * v.unsqueeze(1), bag_index, n_bags)  # (B, Q, h, dh)
        out = self._finish(qp.unsqueeze(0), attended.flatten(2), queries.unsqueeze(0))  # (B, Q, dim)
        return out, log_a

    def spread(self, x: torch.Tensor, keys: torch.Tensor, bag_index: torch.Tensor) -> torch.Tensor:
        """x (T, dim_q), keys (B, R, dim_k) → (T, dim): each instance attends over its bag's R keys."""
        qp = self.fc_q(x)  # (T, dim)
        q = self._project(qp, 0)  # (T, h, dh)
        k = self._project(self.fc_k(keys), 1)[bag_index]  # (T, R, h, dh)
        v = self._project(self.fc_v(keys), 2)[bag_index]  # (T, R, h, dh)
        a = torch.softmax(torch.einsum("thd,trhd->trh", q, k) / math.sqrt(self.head_dim), dim=1)  # over R
        attended = torch.einsum("trh,trhd->thd", a, v).flatten(1)  # (T, dim)
        return self._finish(qp, attended, x)


class GAB(nn.Module):
    """Gated attention block: project the bag onto r latent vectors and back (the paper's eq. 16)."""

    def __init__(self, dim_in: int, dim: int, heads: int, rank: int, ln: bool):
        super().__init__()
        self.latent = nn.Parameter(torch.empty(rank, dim))
        nn.init.xavier_uniform_(self.latent.unsqueeze(0))  # the official (1, r, dim) tensor's fan
        self.project_forward = MAB(dim, dim_in, dim, heads, ln, gated=True)
        self.project_backward = MAB(dim_in, dim, dim, heads, ln, gated=True)

    def forward(self, x: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> torch.Tensor:
        h, _ = self.project_forward.pool(self.latent, x, bag_index, n_bags)  # (B, r, dim)
        return self.project_backward.spread(x, h, bag_index)  # (T, dim)


class ILRAOptions(HeadsOptions):
    ilra_layers: int = Field(2, ge=1, description="Gated attention blocks (GAB) stacked in ilra (the paper's 2).")
    ilra_rank: int = Field(1, ge=1, description="Rank of ilra's low-rank latent matrix: latent vectors per block (the official CAMELYON16 config's topk=1).")
    ilra_layer_norm: bool = Field(True, description="LayerNorms inside ilra's attention blocks (the official config's ln: true).")


@register("ilra", ILRAOptions)
class ILRA(MILModel):
    def __init__(self, cfg: ILRAOptions, in_dim: int, n_classes: int):
        super().__init__()
        d, heads = cfg.hidden, cfg.n_heads
        self.gab_blocks = nn.ModuleList(
            GAB(in_dim if i == 0 else d, d, heads, cfg.ilra_rank, cfg.ilra_layer_norm) for i in range(cfg.ilra_layers)
        )
        self.seed = nn.Parameter(torch.empty(1, d))
        nn.init.xavier_uniform_(self.seed.unsqueeze(0))
        self.pooling = MAB(d, d, d, heads, cfg.ilra_layer_norm, gated=False)
        self.classifier = nn.Linear(d, n_classes)
        for m in self.modules():  # the official initialize_weights: xavier-normal Linear weights
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)

    def forward(self, feats: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> MILOutput:
        x = feats
        for block in self.gab_blocks:
            x = block(x, bag_index, n_bags)  # (T, hidden)
        z, log_a = self.pooling.pool(self.seed, x, bag_index, n_bags)  # (B, 1, hidden), (T, 1, heads)
        log_a = log_a[:, 0]  # (T, heads)
        return MILOutput(logits=self.classifier(z[:, 0]), attn_scores=log_a, attn_index=bag_index, n_segments=n_bags, attn_log=log_a)
