"""Segment operations over packed bags: reductions and softmax per segment (bag, pseudo-bag...).

``index`` maps each row to its segment (0 ≤ index < n_segments). Rows of one segment need not be
contiguous. All functions keep a leading row dimension and any trailing dims (e.g. heads).
"""

from __future__ import annotations

import torch


def _expand(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return index.view(-1, *([1] * (like.dim() - 1))).expand_as(like)


def segment_sum(x: torch.Tensor, index: torch.Tensor, n_segments: int) -> torch.Tensor:
    """(T, *F) → (S, *F): sum of rows per segment."""
    if n_segments == 1:
        return x.sum(dim=0, keepdim=True)
    out = x.new_zeros((n_segments, *x.shape[1:]))
    return out.index_add_(0, index, x)


def segment_count(index: torch.Tensor, n_segments: int) -> torch.Tensor:
    """(T,) → (S,): rows per segment."""
    return torch.bincount(index, minlength=n_segments)


def segment_mean(x: torch.Tensor, index: torch.Tensor, n_segments: int) -> torch.Tensor:
    """(T, *F) → (S, *F): mean of rows per segment (empty segments give 0)."""
    count = segment_count(index, n_segments).clamp(min=1).to(x.dtype)
    return segment_sum(x, index, n_segments) / count.view(-1, *([1] * (x.dim() - 1)))


def segment_max(x: torch.Tensor, index: torch.Tensor, n_segments: int) -> torch.Tensor:
    """(T, *F) → (S, *F): max of rows per segment (empty segments give -inf); differentiable."""
    out = x.new_full((n_segments, *x.shape[1:]), float("-inf"))
    return out.scatter_reduce(0, _expand(index, x), x, reduce="amax", include_self=True)


def segment_log_softmax(scores: torch.Tensor, index: torch.Tensor, n_segments: int) -> torch.Tensor:
    """(T, *H) → (T, *H): log-softmax of scores within each segment, numerically stable.

    The per-segment max is subtracted as a constant (detached): softmax is shift-invariant, so this
    changes no value or gradient, only keeps exp() from overflowing.
    """
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()  # softmax and entropy in float32 even under bf16 autocast (train.precision)
    if n_segments == 1:  # one bag per step (the paper's setting): the plain op, same math, fewer kernels
        return torch.log_softmax(scores, dim=0)
    shift = segment_max(scores.detach(), index, n_segments)  # (S, *H)
    z = scores - shift[index]
    log_norm = torch.log(segment_sum(torch.exp(z), index, n_segments))  # (S, *H)
    return z - log_norm[index]


def segment_softmax(scores: torch.Tensor, index: torch.Tensor, n_segments: int) -> torch.Tensor:
    """(T, *H) → (T, *H): softmax within each segment; rows of a segment sum to 1."""
    return torch.exp(segment_log_softmax(scores, index, n_segments))


def segment_rank(values: torch.Tensor, index: torch.Tensor, n_segments: int, descending: bool = True) -> torch.Tensor:
    """(T,) or (T, H) → same shape, int64: each row's rank within its segment, per column.

    Rank 0 is the largest value (``descending``) or the smallest. Ties keep row order, so a bag ranks
    its rows the same whether it is packed with others or alone. Used for top-k selection (ACMIL
    masking, CLAM's instance sampling, DTFD's max/min instances, DSMIL's critical instance).
    """
    if values.dim() == 2:
        t, h = values.shape
        cols = torch.arange(h, device=index.device).unsqueeze(1)  # (H, 1)
        flat_index = (index.unsqueeze(0) + n_segments * cols).reshape(-1)  # (H·T,) one segment per (segment, column)
        ranks = segment_rank(values.t().reshape(-1), flat_index, n_segments * h, descending)
        return ranks.view(h, t).t()
    order = torch.sort(values, descending=descending, stable=True).indices
    order = order[torch.sort(index[order], stable=True).indices]  # by segment, then by value
    counts = segment_count(index, n_segments)
    starts = torch.cumsum(counts, 0) - counts  # (S,)
    rank = torch.empty_like(index)
    rank[order] = torch.arange(order.shape[0], device=index.device) - starts[index[order]]
    return rank


def segment_argmax(values: torch.Tensor, index: torch.Tensor, n_segments: int) -> torch.Tensor:
    """(T,) → (S,) or (T, H) → (S, H): the row holding each segment's maximum (first row on ties).

    Every segment must be non-empty (an empty one would hold -1).
    """
    first = segment_rank(values, index, n_segments) == 0
    if values.dim() == 1:
        rows = first.nonzero().squeeze(1)
        out = torch.full((n_segments,), -1, dtype=torch.int64, device=index.device)
        out[index[rows]] = rows
        return out
    rows, cols = first.nonzero(as_tuple=True)
    out = torch.full((n_segments, values.shape[1]), -1, dtype=torch.int64, device=index.device)
    out[index[rows], cols] = rows
    return out
