"""The attention regularisers and the total loss.

AEM (the paper's term) per bag is ``Σ_i a_i log a_i`` — the negative entropy of the bag's attention,
natural log, from the log-softmax of the scores so that tiny weights cannot give ``0 · log 0``.
Minimising it maximises attention entropy. ``kl_uniform`` is the paper's ablation, the KL divergence
loss of C2C: ``KL(u ‖ a) = −log N − (1/N) Σ_i log a_i`` with ``u`` uniform over the bag's N instances.
The other direction would not be an ablation: ``KL(a ‖ u) = Σ a log a + log N`` differs from AEM by a
constant per bag, so it trains exactly like AEM. ``KL(u ‖ a)`` pulls every weight up through
``log a_i`` (it punishes near-zero weights, where AEM punishes peaks).

With several heads/branches (or sub-bag segments) the per-bag term is the mean over them. A batch's
term is the mean over its bags, so every term in the loss is a mean over bags.

``train.class_weights`` (:func:`class_weights`) multiplies each bag's slide-label cross-entropy by its
class's weight (:meth:`aem_dist.models.base.MILModel.bag_ce`); the batch still takes the plain mean over
its bags, so a packed batch's gradient stays the mean of its bags' (weighted) gradients.
"""

from __future__ import annotations

import math
from typing import Sequence, get_args

import torch

from .config import LossKind
from .models.base import MILOutput
from .models.segment import segment_count, segment_mean, segment_sum

KINDS = get_args(LossKind)


def segment_neg_entropy(log_a: torch.Tensor, index: torch.Tensor, n_segments: int) -> torch.Tensor:
    """(R, H) log-attention → (S, H): Σ a log a within each segment (0 for a one-row segment)."""
    return segment_sum(torch.exp(log_a) * log_a, index, n_segments)


def attention_regulariser(out: MILOutput, n_bags: int, kind: str = "neg_entropy") -> torch.Tensor:
    """Scalar: mean over bags of the per-bag regulariser (mean over heads and segments)."""
    if kind not in KINDS:
        raise ValueError(f"loss.kind {kind!r} not in {KINDS}")
    if out.attn_scores is None:
        return out.logits.new_zeros(())
    log_a = out.log_attention()  # (R, H)
    if kind == "kl_uniform":
        n = segment_count(out.attn_index, out.n_segments).to(log_a.dtype)  # (S,)
        per_segment = -torch.log(n.clamp_min(1)).unsqueeze(1) - segment_mean(log_a, out.attn_index, out.n_segments)  # (S, H)
    else:
        per_segment = segment_neg_entropy(log_a, out.attn_index, out.n_segments)  # (S, H)
    per_segment = per_segment.mean(dim=1)  # (S,)
    if out.segment_bag is None:
        per_bag = per_segment
    else:
        per_bag = segment_mean(per_segment, out.segment_bag, n_bags)  # (B,)
    return per_bag.mean()


def total_loss(terms: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """Σ weight·term with weight λ for ``aem`` and 1 for every other (model-defined) term."""
    return sum((lam if name == "aem" else 1.0) * value for name, value in terms.items())


def uniform_neg_entropy(n: int) -> float:
    """Σ a log a of the uniform distribution over n items: −log n (for tests and plots)."""
    return -math.log(n)


def class_weights(spec: str | Sequence[float], train_counts: Sequence[int], class_names: Sequence[str] = ()) -> tuple[float, ...] | None:
    """``train.class_weights`` resolved against the training split's class counts: None for ``none``;
    ``balanced``: ``n / (C · n_c)`` (scikit-learn's rule: every class weighs as much in total); a list as
    given. Raises ValueError naming ``train.class_weights`` for a wrong length or an empty class."""
    if spec == "none":
        return None
    n_classes = len(train_counts)
    if spec == "balanced":
        empty = [str(class_names[i]) if i < len(class_names) else str(i) for i, c in enumerate(train_counts) if c == 0]
        if empty:
            raise ValueError(f"train.class_weights=balanced: the training split has no bag of class {', '.join(empty)}")
        total = sum(train_counts)
        return tuple(total / (n_classes * c) for c in train_counts)
    weights = tuple(float(w) for w in spec)
    if len(weights) != n_classes:
        raise ValueError(f"train.class_weights has {len(weights)} weights for the dataset's {n_classes} classes ({', '.join(map(str, class_names))})")
    return weights
