"""Epoch plans for the streaming loader, computed from the manifest alone.

Every rank computes the same plan from ``(manifest split, world_size, workers, seed, epoch)`` without
listing storage or talking to the other ranks. A plan says, for each rank and each of its DataLoader
workers, which batches (lists of planned bags) it produces, in order.

1. **Order.** Training: the shards in a permutation fixed by ``(seed, epoch)``, and inside each shard
   its bags in a permutation fixed by ``(seed, epoch, shard)``. Evaluation: manifest order. With
   ``sampler="balanced"`` each bag appears as often as :func:`aem_dist.data.packing.balanced_counts`
   draws it (the in-memory loader's counts), its copies inside its own shard's permutation, so shards
   are still read one after another.
2. **Pack.** The whole ordered sequence is packed greedily, as :func:`aem_dist.data.packing.plan_batches`
   does, so packing is as tight as one process's. Training: then batches are halved
   (:func:`aem_dist.data.packing.balance_batches`) until their number divides evenly by the world
   size, so every rank gets the same number of real batches.
3. **Deal by rank, then by worker.** The batch list is cut into ``world_size`` contiguous runs whose
   lengths differ by at most one, and each rank's run into ``workers`` contiguous runs the same way.
   Contiguous runs of a shard-ordered sequence mean each rank and worker reads its own few shards (a
   shard at a boundary is shared, each side reading only its own bags). Ranks' step counts therefore
   differ by at most one before padding. (Cutting bags by cost before packing, as earlier versions
   did, left ranks several steps apart at 2–8 ranks: 3–21 % of bag visits were repeats.)
4. **Remainder (training only).** Every rank must run the same number of steps (DDP and Ray's report
   barrier hang otherwise). Only when no batch can be split (one-bag batches) is a rank one batch
   short; it repeats its own first batch (wrap-around, as the in-memory loader does); a rank with no
   batch at all repeats the first batch of the epoch. At most ``world_size - 1`` batches are repeated
   per epoch and nothing is dropped: with
   ``max_bags_per_batch: 1`` and ``N`` bags, ``ceil(N / world) · world - N`` bags are seen twice.
   :attr:`EpochPlan.repeat_fraction` reports the share of bag visits that are repeats.
   Evaluation repeats nothing: every bag is evaluated exactly once across ranks.

The DataLoader hands out worker outputs round-robin, so a rank's batch order is fixed by the plan and
``num_workers``; the same seed and epoch always give the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .manifest import SplitEntry
from .packing import balance_batches, balanced_counts, epoch_order, plan_batches


@dataclass(frozen=True)
class BagRef:
    """A planned bag: where it lives and what the manifest says about it."""

    shard: int  # index into the split's shard list
    key: str
    label: int
    n: int


Batch = tuple[BagRef, ...]


@dataclass(frozen=True)
class EpochPlan:
    """``ranks[r][w]`` = the batches worker ``w`` of rank ``r`` produces, in order."""

    ranks: tuple[tuple[tuple[Batch, ...], ...], ...]
    repeats: int = 0  # bag visits added by padding ranks to equal steps

    @property
    def repeat_fraction(self) -> float:
        """Share of this epoch's bag visits (all ranks) that are padding repeats."""
        visits = sum(len(b) for r in self.ranks for w in r for b in w)
        return self.repeats / visits if visits else 0.0

    def steps(self, rank: int) -> int:
        return sum(len(w) for w in self.ranks[rank])

    def rank_order(self, rank: int) -> list[Batch]:
        """Batches of ``rank`` in the order a DataLoader yields them (round-robin over workers)."""
        workers = [list(w) for w in self.ranks[rank]]
        out: list[Batch] = []
        i = 0
        while any(i < len(w) for w in workers):
            out += [w[i] for w in workers if i < len(w)]
            i += 1
        return out

    def shards_of(self, rank: int, worker: int) -> list[int]:
        """Shards worker ``worker`` of ``rank`` touches, in first-use order."""
        seen: dict[int, None] = {}
        for batch in self.ranks[rank][worker]:
            for ref in batch:
                seen.setdefault(ref.shard, None)
        return list(seen)


def _deal(n: int, parts: int) -> list[tuple[int, int]]:
    """Cut positions 0..n into ``parts`` contiguous ranges whose lengths differ by at most one."""
    base, extra = divmod(n, max(1, parts))
    bounds = [0]
    for i in range(max(1, parts)):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return list(zip(bounds[:-1], bounds[1:]))


def epoch_sequence(split: SplitEntry, *, train: bool, seed: int, epoch: int, sampler: str = "shuffle") -> list[BagRef]:
    """The split's bags in this epoch's order (see module docstring, step 1)."""
    n_shards = len(split.shards)
    shard_order = epoch_order(n_shards, seed, epoch) if train else np.arange(n_shards)
    balanced = train and sampler == "balanced"
    if balanced:  # drawn over the split's bags in manifest order, as the in-memory loader holds them
        counts = balanced_counts([b.label for b in split.bags()], seed, epoch)
        first = np.cumsum([0] + [len(s.bags) for s in split.shards])
    seq: list[BagRef] = []
    for s in shard_order:
        shard = split.shards[int(s)]
        items = np.repeat(np.arange(len(shard.bags)), counts[first[s] : first[s + 1]]) if balanced else np.arange(len(shard.bags))
        inner = items[np.random.default_rng([seed, epoch, int(s), 0xBA6]).permutation(len(items))] if train else items
        seq += [BagRef(int(s), shard.bags[int(i)].key, shard.bags[int(i)].label, shard.bags[int(i)].n) for i in inner]
    return seq


def plan_epoch(
    split: SplitEntry,
    *,
    world_size: int,
    workers: int,
    train: bool,
    seed: int,
    epoch: int,
    max_instances: int | None,
    max_bags: int,
    sampler: str = "shuffle",
) -> EpochPlan:
    """The whole epoch's plan for every rank and worker (pure; see module docstring)."""
    workers = max(1, workers)
    seq = epoch_sequence(split, train=train, seed=seed, epoch=epoch, sampler=sampler)
    batches = [tuple(seq[j] for j in b) for b in plan_batches([r.n for r in seq], max_instances, max_bags)]
    if train:
        batches = balance_batches(batches, world_size)
    ranks: list[list[list[Batch]]] = []
    for lo, hi in _deal(len(batches), world_size):
        ranks.append([batches[lo + wlo : lo + whi] for wlo, whi in _deal(hi - lo, workers)])
    repeats = _pad_to_equal_steps(ranks) if train else 0
    return EpochPlan(tuple(tuple(tuple(w) for w in r) for r in ranks), repeats)


def _pad_to_equal_steps(ranks: list[list[list[Batch]]]) -> int:
    """Pad every rank to the busiest rank's step count; returns the bag visits added."""
    added = 0
    steps = [sum(len(w) for w in r) for r in ranks]
    target = max(steps)
    everything = [b for r in ranks for b in EpochPlan((tuple(tuple(w) for w in r),)).rank_order(0)]
    for r, per_worker in enumerate(ranks):
        missing = target - steps[r]
        if missing <= 0:
            continue
        own = EpochPlan((tuple(tuple(w) for w in per_worker),)).rank_order(0)
        source = own or everything
        for i in range(missing):
            # Give each repeat to the worker with the fewest batches, to keep workers balanced.
            w = min(range(len(per_worker)), key=lambda k: len(per_worker[k]))
            per_worker[w].append(source[i % len(source)])
            added += len(source[i % len(source)])
    return added

