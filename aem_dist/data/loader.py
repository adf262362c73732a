"""The loader interface the engine uses, and the in-memory implementation.

The engine asks for a :class:`SplitLoader` per split and rank; it yields :class:`PackedBatch` es for
an epoch and says how many steps that epoch has. The in-memory loader reads every bag of the split
into RAM once; the streaming loader (:mod:`aem_dist.data.stream`) reads shards from storage behind
the same interface. Which one a run gets (``data.loader``) is looked up in :mod:`aem_dist.data.registry`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from .. import storage
from ..storage import StorageOptions
from .manifest import Manifest
from .packing import PackedBatch, pack, plan_rank, plan_repeat_fraction
from .schema import Bag, BadSampleError
from .shards import read_shard

log = logging.getLogger(__name__)


@dataclass
class LoaderSpec:
    """What a loader needs to know besides the data itself."""

    split: str
    rank: int = 0
    world_size: int = 1
    train: bool = False
    seed: int = 0
    max_instances: int | None = None
    max_bags: int = 1
    on_bad_sample: str = "error"
    with_coords: bool = False
    sampler: str = "shuffle"  # data.sampler (training only): shuffle, or balanced (class-balanced draws with replacement)


class SplitLoader(Protocol):
    spec: LoaderSpec
    skipped: Counter

    @property
    def n_bags(self) -> int:
        """Bags of the split across all ranks."""

    @property
    def listed_bags(self) -> int:
        """Bags the manifest lists for the split."""

    @property
    def lost(self) -> set[tuple[str, str]]:
        """(shard, key) of listed bags this loader could not use (bad samples under ``skip``)."""

    def steps(self, epoch: int) -> int:
        """Steps this rank runs in ``epoch``."""

    def epoch(self, epoch: int) -> Iterator[PackedBatch]:
        """This rank's batches of ``epoch``."""

    def repeat_fraction(self, epoch: int) -> float:
        """Share of ``epoch``'s bag visits (all ranks) that repeat a bag to equalise steps (training)."""

    def in_memory(self) -> "InMemoryLoader | None":
        """The loader itself when the whole split is decoded in host RAM (so it can be copied to a device
        once), else None (a loader that reads shards as it trains)."""


@dataclass
class SkipCounter:
    """Bad-sample policy: raise (``error``) or count by reason and go on (``skip``).

    Counts are of distinct problems — (reason, shard, key) — so a bad bag met again in a later
    epoch (the streaming loader re-reads every epoch) is counted and logged once.
    """

    policy: str = "error"
    counts: Counter = field(default_factory=Counter)
    seen: set = field(default_factory=set)

    def __call__(self, err: BadSampleError) -> None:
        if self.policy != "skip":
            raise err
        self.record(err.reason, err.shard, err.key, str(err))

    def record(self, reason: str, shard: str | None, key: str | None, message: str = "") -> bool:
        """Count one skipped problem; False if it was already counted."""
        ident = (reason, shard, key)
        if ident in self.seen:
            return False
        self.seen.add(ident)
        self.counts[reason] += 1
        log.warning("skipping bad sample: %s", message or f"shard {shard}, key {key!r} [{reason}]")
        return True


def read_split(root: str, manifest: Manifest, split: str, *, options: StorageOptions | None = None, on_bad: SkipCounter | None = None) -> list[Bag]:
    """Every bag of ``split`` in manifest order, validated against the manifest (including each
    shard's size and sha256: a shard that does not match is rejected whole)."""
    on_bad = on_bad or SkipCounter()
    entry = manifest.split(split)
    bags: list[Bag] = []
    for shard in entry.shards:
        expected = {b.key: b for b in shard.bags}
        got: list[Bag] = []
        url = storage.join(root, shard.name)
        duplicated: set[str] = set()
        problems: list[BadSampleError] = []  # held back until the shard's sha256 is known

        try:
            for bag in read_shard(url, dim=manifest.dim, n_classes=manifest.n_classes, options=options, on_bad=problems.append,
                expect=(shard.bytes, shard.sha256)):
                want = expected.get(bag.key)
                if want is None and bag.key in shard._also_holds:
                    continue  # a fold view: this bag belongs to the fold's other splits
                if want is None:
                    problems.append(BadSampleError("not_in_manifest", "bag is not listed in the manifest", shard=shard.name, key=bag.key))
                elif (want.label, want.n) != (bag.label, bag.n):
                    problems.append(BadSampleError("manifest_mismatch", f"(label, n) = ({bag.label}, {bag.n}) but manifest says ({want.label}, "
                        f"{want.n})", shard=shard.name, key=bag.key))
                else:
                    got.append(bag)
        except FileNotFoundError:
            on_bad(BadSampleError("missing_shard", f"shard listed in the manifest is missing at {storage.redact(url, options)}", shard=shard.name))
            continue
        except BadSampleError as err:
            if err.reason != "sha256_mismatch":
                raise
            on_bad(err)  # an unverified shard contributes nothing, and its inner problems are moot
            continue
        for err in problems:
            if err.key is not None and err.key in shard._also_holds:
                continue  # another split's bag: reported when that split is read
            if err.reason == "duplicate_key" and err.key:
                duplicated.add(err.key)
            on_bad(err)
        got = [b for b in got if b.key not in duplicated]  # a duplicated key is rejected whole, first copy too
        if len(got) != shard.n_bags and on_bad.policy != "skip":
            raise BadSampleError("count_mismatch", f"read {len(got)} bags, manifest lists {shard.n_bags}", shard=shard.name)
        bags.extend(got)
    return bags


class InMemoryLoader:
    """All bags of a split in RAM (float16), packed per step."""

    def __init__(self, bags: list[Bag], spec: LoaderSpec, skipped: Counter | None = None, listed: dict[str, str] | None = None):
        self.spec = spec
        self.bags = bags
        self.sizes = [b.n for b in bags]
        self.skipped = skipped if skipped is not None else Counter()
        self._listed = listed if listed is not None else {b.key: "" for b in bags}  # key → shard

    @property
    def n_bags(self) -> int:
        return len(self.bags)

    @property
    def listed_bags(self) -> int:
        return len(self._listed)

    @property
    def lost(self) -> set[tuple[str, str]]:
        kept = {b.key for b in self.bags}
        return {(shard, key) for key, shard in self._listed.items() if key not in kept}

    def in_memory(self) -> "InMemoryLoader":
        return self

    def plan(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` as positions in :attr:`bags`."""
        s = self.spec
        return plan_rank(
            self.sizes,
            rank=s.rank,
            world_size=s.world_size,
            max_instances=s.max_instances,
            max_bags=s.max_bags,
            train=s.train,
            seed=s.seed,
            epoch=epoch,
            labels=self._sampled_labels(),
        )

    def _sampled_labels(self) -> list[int] | None:
        """The labels a balanced sampler draws by (None: every bag once, shuffled)."""
        return [b.label for b in self.bags] if self.spec.train and self.spec.sampler == "balanced" else None

    def steps(self, epoch: int) -> int:
        return len(self.plan(epoch))

    def repeat_fraction(self, epoch: int) -> float:
        s = self.spec
        return plan_repeat_fraction(self.sizes, world_size=s.world_size, max_instances=s.max_instances, max_bags=s.max_bags, train=s.train, seed=s.seed,
            epoch=epoch, labels=self._sampled_labels())

    def epoch(self, epoch: int) -> Iterator[PackedBatch]:
        for batch in self.plan(epoch):
            yield pack([self.bags[i] for i in batch], dtype=torch.float32, with_coords=self.spec.with_coords)


def open_memory(root: str, manifest: Manifest, spec: LoaderSpec, options: StorageOptions | None = None) -> InMemoryLoader:
    """The in-memory :class:`SplitLoader` for ``spec``: every bag of the split read from ``root``."""
    counter = SkipCounter(spec.on_bad_sample)
    bags = read_split(root, manifest, spec.split, options=options, on_bad=counter)
    listed = {b.key: shard.name for shard in manifest.split(spec.split).shards for b in shard.bags}
    return InMemoryLoader(bags, spec, counter.counts, listed)
