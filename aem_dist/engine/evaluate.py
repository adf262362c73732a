"""Evaluation: per-bag predictions on each rank, gathered, then metrics over all bags.

Each rank evaluates its share of the split (every bag exactly once across ranks, see
:func:`aem_dist.data.packing.plan_rank`) with the unwrapped model, so no collective runs inside the
loop and ranks may take different numbers of steps. The per-bag records are then gathered to every
rank and the metrics computed on the whole split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.loader import SplitLoader
from . import precision as prec
from .dist import DistContext
from .metrics import attention_stats, bag_attention_stats, classification_metrics


@dataclass
class BagPrediction:
    key: str
    label: int
    probs: np.ndarray  # (C,)
    attn_stats: tuple[float, float, float] | None = None  # entropy, normalised entropy, top-1 % share
    attention: np.ndarray | None = None  # (N,) per instance, sums to 1; only with keep_attention
    coords: np.ndarray | None = None  # (N, 2); only with keep_attention and a coords-carrying loader
    embedding: np.ndarray | None = None  # (hidden,) pooled bag embedding; with keep_attention, where the model has one


@dataclass
class EvalResult:
    metrics: dict[str, float]
    predictions: list[BagPrediction] = field(default_factory=list)


@torch.no_grad()
def predict(model: nn.Module, loader: SplitLoader, ctx: DistContext, *, keep_attention: bool = False, epoch: int = 0,
        precision: str = "fp32") -> list[BagPrediction]:
    """This rank's per-bag predictions: probabilities, attention statistics and (``keep_attention``)
    the per-instance attention itself. The forward runs at ``precision`` (the run's ``train.precision``:
    bf16 autocast for its matmuls), probabilities and attention are computed from float32 outputs."""
    model.eval()
    out_rows: list[BagPrediction] = []
    for batch in loader.epoch(epoch):
        coords = batch.coords
        batch = batch.to(ctx.device, next(model.parameters()).dtype)
        with prec.autocast(precision, batch.feats.device):
            out = model(batch.feats, batch.bag_index, batch.n_bags)
        out = prec.float32_output(out)
        probs = torch.softmax(out.logits.double(), dim=1).cpu().numpy()
        attn = out.instance_attention(batch.bag_index, batch.n_bags)
        emb = out.embedding.float().cpu().numpy() if keep_attention and out.embedding is not None else None
        out_rows += _bag_rows(batch, probs, attn.double().cpu().numpy() if attn is not None else None, coords if keep_attention else None, keep_attention, emb)
    return out_rows


@torch.no_grad()
def predict_population(pop: nn.Module, loader: SplitLoader, ctx: DistContext, *, epoch: int = 0) -> list[list[BagPrediction]]:
    """This rank's per-bag predictions of every member of a population, from one pass over the split."""
    pop.eval()
    out_rows: list[list[BagPrediction]] = [[] for _ in range(pop.size)]
    for batch in loader.epoch(epoch):
        batch = batch.to(ctx.device, pop.flat.dtype)
        # chunk of members after chunk, as in training: each chunk's activations sized to the cache
        outs = [pop.predict(batch.feats, batch.bag_index, batch.n_bags, part) for part in pop.chunks(batch.n_instances)]
        logits = torch.cat([o[0] for o in outs])  # (K, B, C)
        attn = torch.cat([o[1] for o in outs]) if outs[0][1] is not None else None  # (K, T)
        probs = torch.softmax(logits.double(), dim=2).cpu().numpy()
        attn_np = attn.double().cpu().numpy() if attn is not None else None
        for k, rows in enumerate(out_rows):
            rows += _bag_rows(batch, probs[k], attn_np[k] if attn_np is not None else None, None, False)
    return out_rows


def _bag_rows(batch, probs: np.ndarray, attn_np: np.ndarray | None, coords, keep_attention: bool, emb: np.ndarray | None = None) -> list[BagPrediction]:
    offsets = batch.offsets.cpu().numpy()
    rows = []
    for b, key in enumerate(batch.keys):
        lo, hi = offsets[b], offsets[b + 1]
        rows.append(
            BagPrediction(
                key=key,
                label=int(batch.labels[b]),
                probs=probs[b],
                attn_stats=bag_attention_stats(attn_np[lo:hi]) if attn_np is not None else None,
                attention=attn_np[lo:hi] if keep_attention and attn_np is not None else None,
                coords=coords[lo:hi].numpy() if keep_attention and coords is not None else None,
                embedding=emb[b] if emb is not None else None,
            )
        )
    return rows


def gather_predictions(rows: list[BagPrediction], ctx: DistContext, loader: SplitLoader | None = None) -> list[BagPrediction]:
    """All ranks' predictions, sorted by key. With ``loader``, checks that every bag the manifest lists
    was predicted exactly once, except bags some rank had to skip (their keys are gathered too)."""
    parts = ctx.gather_objects((rows, sorted(loader.lost) if loader is not None else []))
    merged = [r for part, _ in parts for r in part]
    keys = [r.key for r in merged]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise RuntimeError(f"evaluation saw bags more than once across ranks: {dup}")
    if loader is not None:
        lost = {tuple(item) for _, part_lost in parts for item in part_lost}
        expected = loader.listed_bags - len(lost)
        if len(merged) != expected:
            raise RuntimeError(f"evaluation gathered {len(merged)} bags, expected {expected} ({len(lost)} skipped)")
    return sorted(merged, key=lambda r: r.key)


def split_metrics(rows: list[BagPrediction], n_classes: int) -> dict[str, float]:
    if not rows:
        return classification_metrics(np.zeros((0, n_classes)), np.zeros(0), n_classes) | attention_stats([])
    probs = np.stack([r.probs for r in rows])
    labels = np.array([r.label for r in rows])
    attn = [r.attn_stats for r in rows if r.attn_stats is not None]
    return classification_metrics(probs, labels, n_classes) | attention_stats(attn)


def evaluate(model: nn.Module, loader: SplitLoader, ctx: DistContext, n_classes: int, **kw: Any) -> EvalResult:
    """Metrics of ``model`` on the whole split behind ``loader`` (all ranks together)."""
    rows = gather_predictions(predict(model, loader, ctx, **kw), ctx, loader)
    return EvalResult(split_metrics(rows, n_classes), rows)
