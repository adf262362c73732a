"""TransMIL (Shao et al. 2021): a two-layer Nyström transformer with a class token and the PPEG.

Per bag: h = ReLU(W_r x) (N × hidden); the sequence is squared up to ⌈√N⌉² tokens by repeating its
first instances; a learnable class token is prepended; then x ← x + NystromAttention(LayerNorm(x)),
the PPEG (depthwise 7×7, 5×5 and 3×3 convolutions over the ⌈√N⌉ × ⌈√N⌉ token grid, plus identity;
the class token passes through), a second attention layer, LayerNorm, and logits from the class token.

Nyström attention (Xiong et al. 2021, as TransMIL uses it): heads = ``n_heads``, head width
hidden / heads, hidden / 2 landmarks, 6 Moore-Penrose iterations, a depthwise residual convolution
(kernel 33) over the values; the sequence is zero-padded at the front to a multiple of the landmark
count, landmarks are means of consecutive token groups.

A transformer needs each bag as one sequence, so the packed batch is processed bag by bag (each bag
exactly as if alone). TransMIL has no attention-pooling weights; its AEM term is 0 (``attn_scores``
is None), so λ changes nothing for it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .abmil import instance_embedding
from .base import MILModel, MILOutput
from .mha import HeadsOptions
from .registry import register
from .segment import segment_count


def iterative_pinv(x: torch.Tensor, iters: int) -> torch.Tensor:
    """(H, m, m) → (H, m, m): Moore-Penrose pseudo-inverse by the Nyströmformer's iteration.

    Starts from xᵀ / (max row-sum · max column-sum) over all heads, then
    z ← ¼ z (13 I − x z (15 I − x z (7 I − x z))).
    """
    abs_x = x.abs()
    z = x.transpose(-1, -2) / (abs_x.sum(-1).max() * abs_x.sum(-2).max())
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Nyström self-attention over one sequence (N, dim) → (N, dim)."""

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iters: int = 6, conv_kernel: int = 33, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim, self.landmarks, self.pinv_iters = heads, dim // heads, landmarks, pinv_iters
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, m = x.shape[0], self.landmarks
        x = F.pad(x, (0, 0, (-n) % m, 0))  # zero tokens in front up to a multiple of m
        length = x.shape[0]
        q, k, v = (t.reshape(length, self.heads, self.head_dim).transpose(0, 1) for t in self.to_qkv(x).chunk(3, dim=-1))  # (H, L, d)
        q = q / math.sqrt(self.head_dim)
        group = length // m
        q_land = q.reshape(self.heads, m, group, self.head_dim).mean(2)  # (H, m, d)
        k_land = k.reshape(self.heads, m, group, self.head_dim).mean(2)
        kernel1 = torch.softmax(q @ k_land.transpose(-1, -2), dim=-1)  # (H, L, m)
        kernel2 = torch.softmax(q_land @ k_land.transpose(-1, -2), dim=-1)  # (H, m, m)
        kernel3 = torch.softmax(q_land @ k.transpose(-1, -2), dim=-1)  # (H, m, L)
        out = (kernel1 @ iterative_pinv(kernel2, self.pinv_iters)) @ (kernel3 @ v)  # (H, L, d)
        out = out + self.res_conv(v.unsqueeze(0)).squeeze(0)
        out = self.to_out(out.transpose(0, 1).reshape(length, -1))
        return out[-n:]


class TransLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads, landmarks=max(1, dim // 2), dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding: depthwise convolutions over the square token grid (class token first)."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls, tokens = x[:1], x[1:]
        grid = tokens.t().reshape(1, -1, side, side)  # (1, dim, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2)[0].t()], dim=0)


@register("transmil", HeadsOptions)
class TransMIL(MILModel):
    input_linear = "embed.0"

    def __init__(self, cfg: HeadsOptions, in_dim: int, n_classes: int):
        super().__init__()
        if cfg.hidden % cfg.n_heads:
            raise ValueError(f"model.hidden ({cfg.hidden}) must be divisible by model.n_heads ({cfg.n_heads}) for transmil")
        self.embed = instance_embedding(in_dim, cfg)
        self.cls_token = nn.Parameter(torch.randn(1, cfg.hidden))
        self.layer1 = TransLayer(cfg.hidden, cfg.n_heads, cfg.dropout)
        self.pos = PPEG(cfg.hidden)
        self.layer2 = TransLayer(cfg.hidden, cfg.n_heads, cfg.dropout)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.classifier = nn.Linear(cfg.hidden, n_classes)

    def encode_bag(self, h: torch.Tensor) -> torch.Tensor:
        """(N, hidden) one bag → (hidden,) its class-token representation."""
        n = h.shape[0]
        side = math.isqrt(n - 1) + 1  # ⌈√n⌉
        h = torch.cat([self.cls_token, h, h[: side * side - n]], dim=0)
        h = self.layer2(self.pos(self.layer1(h), side))
        return self.norm(h)[0]

    def forward(self, feats: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> MILOutput:
        h = self.embed(feats)  # (T, hidden)
        order = torch.sort(bag_index, stable=True).indices
        counts = segment_count(bag_index, n_bags).tolist()
        bags = torch.split(h[order], counts)
        z = torch.stack([self.encode_bag(b) for b in bags])  # (B, hidden)
        return MILOutput(logits=self.classifier(z))
