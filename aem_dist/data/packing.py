"""Variable-length collation: many bags in one ``(total_instances, D)`` tensor.

A packed batch concatenates its bags' instances and carries ``bag_index`` (which bag each instance
belongs to) and ``offsets`` (bag ``b`` is rows ``offsets[b]:offsets[b+1]``). Models pool per bag with
segment operations, so nothing is padded and nothing is truncated.

Epoch planning is pure arithmetic on bag sizes, so every rank computes the same plan from the
manifest without talking to the others:

1. order the bags (a permutation drawn from ``(seed, epoch)`` for training, manifest order for eval;
   with ``data.sampler: balanced`` the training epoch is a class-balanced draw of as many bags, with
   replacement, in a permutation — :func:`balanced_counts`);
2. pack them greedily in that order under ``max_instances`` and ``max_bags`` — a bag larger than the
   instance budget becomes a batch of its own;
3. deal batches to ranks round-robin. For training the batches are first halved until their number
   divides evenly by the world size (:func:`balance_batches`), so every rank takes the same number of
   real steps; only when no batch can be split (one-bag batches) do ranks that run out wrap around to
   the start of the epoch's plan, so a few batches are seen twice and none is dropped (the DDP
   equal-steps rule). For evaluation nothing is repeated: every bag is evaluated exactly once.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence, TypeVar

import numpy as np
import torch

from .schema import Bag

T = TypeVar("T", list, tuple)


@dataclass
class PackedBatch:
    feats: torch.Tensor  # (T, D)
    bag_index: torch.Tensor  # (T,) int64, bag of each instance, non-decreasing
    offsets: torch.Tensor  # (B + 1,) int64
    labels: torch.Tensor  # (B,) int64
    keys: list[str]
    coords: torch.Tensor | None = None  # (T, 2) int32

    @property
    def n_bags(self) -> int:
        return len(self.keys)

    @property
    def n_instances(self) -> int:
        return int(self.feats.shape[0])

    def sizes(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PackedBatch":
        feats = self.feats.to(device=device, dtype=dtype or self.feats.dtype, non_blocking=True)
        return PackedBatch(
            feats=feats,
            bag_index=self.bag_index.to(device, non_blocking=True),
            offsets=self.offsets.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            keys=self.keys,
            coords=self.coords,
        )


def pack(bags: Sequence[Bag], dtype: torch.dtype = torch.float32, with_coords: bool = False) -> PackedBatch:
    """Concatenate bags into one packed batch (features cast to ``dtype``)."""
    if not bags:
        raise ValueError("cannot pack an empty list of bags")
    sizes = [b.n for b in bags]
    parts = [torch.from_numpy(np.asarray(b.feats)) for b in bags]  # views, no copy
    feats = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(dtype)
    offsets = torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int64)
    coords = None
    if with_coords and all(b.coords is not None for b in bags):
        coords = torch.from_numpy(np.concatenate([b.coords for b in bags], axis=0))
    return PackedBatch(
        feats=feats,
        bag_index=torch.repeat_interleave(torch.arange(len(bags)), torch.tensor(sizes)),
        offsets=offsets,
        labels=torch.tensor([b.label for b in bags], dtype=torch.int64),
        keys=[b.key for b in bags],
        coords=coords,
    )


def plan_batches(sizes: Sequence[int], max_instances: int | None, max_bags: int) -> list[list[int]]:
    """Greedy packing of items (in the given order) into batches; returns lists of item positions."""
    batches: list[list[int]] = []
    current: list[int] = []
    load = 0
    for i, n in enumerate(sizes):
        fits = len(current) < max_bags and (max_instances is None or load + n <= max_instances)
        if current and not fits:
            batches.append(current)
            current, load = [], 0
        current.append(i)
        load += int(n)
    if current:
        batches.append(current)
    return batches


def balance_batches(batches: list[T], parts: int) -> list[T]:
    """Split batches in two until their number is a multiple of ``parts`` (or none can be split).

    Each rank then gets the same number of real batches and none has to repeat one to keep DDP's
    steps equal. The batch with the most bags is halved (the latest among equals), in place, so the
    order of bags is unchanged; halves respect every packing limit the whole batch did. Only
    one-bag batches cannot be split: with ``max_bags 1`` the wrap-around repeats remain.
    """
    out = list(batches)
    while parts > 1 and len(out) % parts:
        i = max(range(len(out)), key=lambda k: (len(out[k]), k))
        if len(out[i]) < 2:
            break
        b = out[i]
        half = len(b) // 2
        out[i : i + 1] = [b[:half], b[half:]]
    return out


def epoch_order(n_items: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of epoch ``epoch``: a permutation fixed by ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n_items)


def balanced_probabilities(labels: Sequence[int]) -> np.ndarray:
    """(n,) the chance that one draw of ``data.sampler: balanced`` picks each bag: ``1 / (C · n_c)`` for a bag
    of class c, with C the classes present — every class equally likely. ``n · p`` is the bag's
    ``train.class_weights: balanced`` weight, so a sampled epoch's expected gradient is the weighted one."""
    labels = np.asarray(labels, dtype=np.int64)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return 1.0 / (len(counts) * counts[inverse])


def balanced_counts(labels: Sequence[int], seed: int, epoch: int) -> np.ndarray:
    """(n,) how often each bag is drawn in training epoch ``epoch`` under ``data.sampler: balanced``: n draws
    with replacement by :func:`balanced_probabilities`, fixed by ``(seed, epoch)``; both loaders draw these
    same counts from the manifest's labels."""
    n = len(labels)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    draws = np.random.default_rng([seed, epoch, 0xBA1A]).choice(n, size=n, replace=True, p=balanced_probabilities(labels))
    return np.bincount(draws, minlength=n)


def train_order(n_items: int, seed: int, epoch: int, labels: Sequence[int] | None = None) -> np.ndarray:
    """Item indices of training epoch ``epoch``: :func:`epoch_order`, or with ``labels`` (``data.sampler:
    balanced``) the :func:`balanced_counts` draw (a bag drawn twice appears twice) in a permutation."""
    if labels is None:
        return epoch_order(n_items, seed, epoch)
    items = np.repeat(np.arange(n_items), balanced_counts(labels, seed, epoch))
    return items[epoch_order(len(items), seed, epoch)]


def plan_rank(
    sizes: Sequence[int],
    *,
    rank: int,
    world_size: int,
    max_instances: int | None,
    max_bags: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    labels: Sequence[int] | None = None,
) -> list[list[int]]:
    """The batches (lists of item indices into ``sizes``) rank ``rank`` runs this epoch.

    Training: shuffled, equal steps on every rank (wrap-around padding); ``labels``: a class-balanced
    draw (:func:`train_order`). Eval: manifest order, every item exactly once across ranks (step counts
    may differ by one; eval runs no collectives).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    order = train_order(len(sizes), seed, epoch, labels) if train else np.arange(len(sizes))
    batches = [[int(order[j]) for j in b] for b in plan_batches([sizes[i] for i in order], max_instances, max_bags)]
    if not batches:
        return []
    if not train:
        return batches[rank::world_size]
    batches = balance_batches(batches, world_size)
    steps = math.ceil(len(batches) / world_size)
    return [batches[(rank + world_size * k) % len(batches)] for k in range(steps)]


def plan_repeat_fraction(sizes: Sequence[int], *, world_size: int, max_instances: int | None, max_bags: int, train: bool, seed: int = 0,
        epoch: int = 0, labels: Sequence[int] | None = None) -> float:
    """Share of the epoch's bag visits (all ranks of :func:`plan_rank`) that are wrap-around repeats
    (a balanced sampler's repeated draws are the draw, not padding)."""
    if not train or not sizes:
        return 0.0
    order = train_order(len(sizes), seed, epoch, labels)
    batches = balance_batches(plan_batches([sizes[i] for i in order], max_instances, max_bags), world_size)
    visits = [len(batches[i % len(batches)]) for i in range(math.ceil(len(batches) / world_size) * world_size)]
    return sum(visits[len(batches):]) / sum(visits)


def subsample(batch: PackedBatch, ratio: float, generator: torch.Generator | None = None) -> PackedBatch:
    """Keep a random ``ceil(ratio · n)`` (at least 1) instances of every bag, in their original order.

    Training-time Subsampling augmentation; ``ratio == 1`` returns the batch unchanged.
    """
    if ratio >= 1.0:
        return batch
    sizes = batch.sizes()
    n, dev = batch.n_instances, batch.feats.device
    keep_n = torch.clamp(torch.ceil(sizes.double() * ratio).long(), min=1)
    # Rank instances within their bag by a random key; keep those ranked below keep_n.
    # The random numbers come from the (CPU) generator whatever the device, so a batch packed on a
    # GPU (data.device_cache) keeps the same instances as on CPU.
    rand = torch.rand(n, generator=generator, dtype=torch.float64).to(dev)
    key = batch.bag_index.double() * 2.0 + rand  # sorts by bag, then randomly inside the bag
    order = torch.argsort(key)
    pos_in_bag = torch.arange(n, device=dev) - batch.offsets[:-1].repeat_interleave(sizes, output_size=n)
    chosen = order[pos_in_bag < keep_n.repeat_interleave(sizes, output_size=n)]
    keep = torch.sort(chosen).values
    offsets = torch.zeros_like(batch.offsets)
    torch.cumsum(keep_n, 0, out=offsets[1:])
    return PackedBatch(
        feats=batch.feats[keep],
        bag_index=batch.bag_index[keep],
        offsets=offsets,
        labels=batch.labels,
        keys=batch.keys,
        coords=batch.coords[keep] if batch.coords is not None else None,
    )
