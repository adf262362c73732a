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
    shift = segment_max(scores.detach(), index, n_segments)  # (S, *H)
    z = scores - shift[index]
    log_norm = torch.log(segment_sum(torch.exp(z), index, n_segments))  # (S, *H)
    return z - log_norm[index]


def segment_softmax(scores: torch.Tensor, index: torch.Tensor, n_segments: int) -> torch.Tensor:
    """(T, *H) → (T, *H): softmax within each segment; rows of a segment sum to 1."""
    return torch.exp(segment_log_softmax(scores, index, n_segments))
