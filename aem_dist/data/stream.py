"""The streaming loader: WebDataset shards read from any fsspec URL through a node-local cache.

It implements the same :class:`aem_dist.data.loader.SplitLoader` interface as the in-memory loader
(``spec``, ``skipped``, ``n_bags``, ``steps(epoch)``, ``epoch(epoch)`` → :class:`PackedBatch`), so the
engine does not know which one it runs on. Memory per worker holds a few batches, never the dataset.

The pipeline is a flat list of small stages (a ``webdataset.DataPipeline``; webdataset has no opener
for ``s3://``, so the shard stage opens shards itself through fsspec and the cache, and no webdataset
decoder ever runs — nothing is unpickled)::

    worker_share   the epoch plan (aem_dist.data.streamplan) → this rank's and this worker's batches
    fetch_shards   verified node-local copies of the shards those batches need, fetched ahead
    read_bags      only feats.npy / coords.npy / json of planned bags → safe decode → check vs manifest
    fill_empty     training: a batch whose bags were all skipped repeats the previous one (equal steps)
    pack_items     PackedBatch (float32) + the skips seen since the last item
    guard          a bad sample under the 'error' policy, or a storage failure, becomes an error item

With ``data.num_workers: 0`` the pipeline runs in a background thread of this process; with ``N > 0``
in ``N`` DataLoader worker processes (round-robin, in order). Either way ``data.prefetch`` batches
are prepared ahead of the training step and the next shard is fetched while the current one is read,
so object-storage I/O overlaps compute.

Bad samples follow ``data.on_bad_sample``: ``error`` stops with a BadSampleError naming shard, key and
problem; ``skip`` drops the bag, counts it once per (reason, shard, key) in ``loader.skipped`` and goes
on. A shard whose bytes do not match the manifest's sha256 is never read (its bags are skipped whole).
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import IO, Any, Iterable, Iterator

import torch
import webdataset as wds

from .. import storage
from ..storage import StorageError, StorageOptions
from .cache import ShardCache
from .loader import LoaderSpec, SkipCounter
from .manifest import Manifest
from .packing import PackedBatch, pack
from .prefetch import in_background
from .schema import Bag, BadSampleError
from .shards import TarIndex, decode_sample, index_tar
from .streamplan import Batch, EpochPlan, plan_epoch

log = logging.getLogger(__name__)

Skip = tuple[str, "str | None", "str | None", str]  # reason, shard, key, message


@dataclass
class Item:
    """What a pipeline yields: a batch (or none) plus the skips seen since the previous item."""

    batch: PackedBatch | None = None
    skips: list[Skip] = field(default_factory=list)
    lost: list[tuple[str, str]] = field(default_factory=list)  # (shard, key) of bags not delivered
    error: tuple[str, str, str | None, str | None] | None = None  # kind, reason/message, shard, key


@dataclass
class StreamSource:
    """Everything a worker needs for one epoch (inherited by forked DataLoader workers)."""

    root: str
    shards: list[tuple[str, str, int]]  # name, sha256, bytes — by shard index
    dim: int
    n_classes: int
    plan: EpochPlan
    rank: int
    train: bool
    policy: str
    with_coords: bool
    cache_dir: str | None
    cache_max_bytes: int
    options: StorageOptions | None
    retries: int
    lookahead: int = 1  # shards fetched ahead of the one being read


# --- stages ---------------------------------------------------------------------------------------


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


def worker_share(src: StreamSource) -> Iterator[Batch]:
    """Split by rank and by DataLoader worker: this worker's planned batches, in order."""
    yield from src.plan.ranks[src.rank][_worker_id()]


@dataclass
class OpenShard:
    file: IO[bytes] | None
    index: TarIndex | None
    error: BadSampleError | None = None


def _open_shard(cache: ShardCache, src: StreamSource, s: int) -> OpenShard:
    name, sha, nbytes = src.shards[s]
    try:
        f = cache.open(storage.join(src.root, name), name, sha, nbytes)
    except BadSampleError as err:
        return OpenShard(None, None, err)
    return OpenShard(f, index_tar(f, name))


def fetch_shards(batches: Iterable[Batch], src: StreamSource) -> Iterator[tuple[Batch, dict[int, OpenShard]]]:
    """Attach open, verified local copies of the shards each batch needs; fetch the next ones ahead."""
    batches = list(batches)
    order: list[int] = list(dict.fromkeys(ref.shard for b in batches for ref in b))
    last_use = {ref.shard: i for i, b in enumerate(batches) for ref in b}
    cache = ShardCache(src.cache_dir, src.cache_max_bytes, src.options, src.retries)
    pending: dict[int, Future] = {}
    open_: dict[int, OpenShard] = {}
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-fetch")
    nxt = 0

    def ahead(upto: int) -> None:
        nonlocal nxt
        while nxt < len(order) and nxt <= upto:
            pending[order[nxt]] = pool.submit(_open_shard, cache, src, order[nxt])
            nxt += 1

    try:
        for i, batch in enumerate(batches):
            for ref in batch:
                if ref.shard not in open_:
                    ahead(order.index(ref.shard) + src.lookahead)
                    open_[ref.shard] = pending.pop(ref.shard).result()
            yield batch, open_
            for s in [s for s in open_ if last_use[s] <= i]:
                shard = open_.pop(s)
                if shard.file is not None:
                    shard.file.close()
    finally:
        # An early stop must not wait for a fetch in flight (it may be retrying a dead server).
        pool.shutdown(wait=False, cancel_futures=True)
        for shard in open_.values():
            if shard.file is not None:
                shard.file.close()


def read_bags(items: Iterable[tuple[Batch, dict[int, OpenShard]]], src: StreamSource) -> Iterator[tuple[list[Bag], list[Skip], list[tuple[str, str]]]]:
    """Read and validate each planned bag; under 'skip' collect problems instead of raising."""
    for batch, shards in items:
        bags: list[Bag] = []
        skips: list[Skip] = []
        lost: list[tuple[str, str]] = []
        for ref in batch:
            name = src.shards[ref.shard][0]
            shard = shards[ref.shard]
            try:
                if shard.error is not None:
                    raise shard.error
                assert shard.file is not None and shard.index is not None
                bag = decode_sample(shard.index.read(shard.file, ref.key), name, dim=src.dim, n_classes=src.n_classes)
                if (bag.label, bag.n) != (ref.label, ref.n):
                    raise BadSampleError("manifest_mismatch", f"(label, n) = ({bag.label}, {bag.n}) but manifest says ({ref.label}, "
                        f"{ref.n})", shard=name, key=ref.key)
            except BadSampleError as err:
                if src.policy != "skip":
                    raise
                # A shard-level problem (sha256, missing, cut) is one problem, not one per bag.
                skips.append((err.reason, err.shard, err.key, str(err)))
                lost.append((name, ref.key))
                continue
            bags.append(bag)
        yield bags, skips, lost


def fill_empty(items: Iterable[tuple[list[Bag], list[Skip], list[tuple[str, str]]]],
        train: bool) -> Iterator[tuple[list[Bag] | None, list[Skip], list[tuple[str, str]]]]:
    """Training keeps its planned step count: a batch that lost all its bags repeats the last good one."""
    last: list[Bag] | None = None
    debt = 0
    for bags, skips, lost in items:
        if bags:
            if train:
                last = bags
                for _ in range(debt):
                    yield last, [], []
                debt = 0
            yield bags, skips, lost
        elif train and last is not None:
            yield last, skips, lost
        else:
            if train:
                debt += 1  # paid back with the first good batch
            yield None, skips, lost
    if debt:
        raise BadSampleError("no_usable_bags", f"every bag planned for this worker was skipped; cannot keep {debt} planned steps")


def pack_items(items: Iterable[tuple[list[Bag] | None, list[Skip], list[tuple[str, str]]]], with_coords: bool) -> Iterator[Item]:
    for bags, skips, lost in items:
        batch = pack(bags, dtype=torch.float32, with_coords=with_coords) if bags else None
        yield Item(batch, skips, lost)


def guard(items: Iterable[Item]) -> Iterator[Item]:
    """Turn the errors we know into an item the main process re-raises (exceptions with custom
    constructors do not survive DataLoader's worker → main hand-off)."""
    try:
        yield from items
    except BadSampleError as err:
        yield Item(error=("bad", f"{err.reason}\x00{err.message}", err.shard, err.key))
    except StorageError as err:
        yield Item(error=("storage", str(err), None, None))


def build_pipeline(src: StreamSource) -> wds.DataPipeline:
    """The flat list of stages (see module docstring); an IterableDataset for torch's DataLoader."""
    return wds.DataPipeline(
        partial(worker_share, src),
        partial(fetch_shards, src=src),
        partial(read_bags, src=src),
        partial(fill_empty, train=src.train),
        partial(pack_items, with_coords=src.with_coords),
        guard,
    )


# --- running the pipeline --------------------------------------------------------------------------

class StreamLoader:
    """One split on one rank, streamed from ``data.root`` (see module docstring)."""

    def __init__(self, data_cfg: Any, manifest: Manifest, spec: LoaderSpec, options: StorageOptions | None = None):
        self.spec = spec
        self.root = str(data_cfg.root)
        self.manifest = manifest
        self.split = manifest.split(spec.split)
        self.options = options
        self.num_workers = int(data_cfg.num_workers)
        self.prefetch = int(data_cfg.prefetch)
        self.cache_dir = data_cfg.cache_dir
        self.cache_max_bytes = int(float(data_cfg.cache_max_gb) * (1 << 30))
        self.retries = int(data_cfg.retries)
        self.counter = SkipCounter(spec.on_bad_sample)
        self.skipped: Counter = self.counter.counts
        self._lost: set[tuple[str, str]] = set()
        self._plans: dict[int, EpochPlan] = {}

    @property
    def n_bags(self) -> int:
        """Bags of the split across all ranks, less those this loader had to skip."""
        return self.split.n_bags - len(self._lost)

    @property
    def listed_bags(self) -> int:
        return self.split.n_bags

    @property
    def lost(self) -> set[tuple[str, str]]:
        """(shard, key) of bags this rank's share could not use so far."""
        return set(self._lost)

    def in_memory(self) -> None:
        return None  # shards are read as training goes: nothing to keep on a device

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            s = self.spec
            if len(self._plans) > 4:
                self._plans.clear()
            self._plans[epoch] = plan_epoch(
                self.split,
                world_size=s.world_size,
                workers=max(1, self.num_workers),
                train=s.train,
                seed=s.seed,
                epoch=epoch,
                max_instances=s.max_instances,
                max_bags=s.max_bags,
                sampler=s.sampler,
            )
        return self._plans[epoch]

    def steps(self, epoch: int) -> int:
        return self.plan(epoch).steps(self.spec.rank)

    def repeat_fraction(self, epoch: int) -> float:
        return self.plan(epoch).repeat_fraction

    def source(self, epoch: int) -> StreamSource:
        return StreamSource(
            root=self.root,
            shards=[(s.name, s.sha256, s.bytes) for s in self.split.shards],
            dim=self.manifest.dim,
            n_classes=self.manifest.n_classes,
            plan=self.plan(epoch),
            rank=self.spec.rank,
            train=self.spec.train,
            policy=self.spec.on_bad_sample,
            with_coords=self.spec.with_coords,
            cache_dir=self.cache_dir,
            cache_max_bytes=self.cache_max_bytes,
            options=self.options,
            retries=self.retries,
        )

    def _items(self, epoch: int) -> Iterator[Item]:
        pipeline = build_pipeline(self.source(epoch))
        if self.num_workers == 0:
            return in_background(pipeline, self.prefetch, "stream-prefetch")
        loader = torch.utils.data.DataLoader(
            pipeline,
            batch_size=None,  # items are already packed batches
            num_workers=self.num_workers,
            prefetch_factor=max(1, -(-self.prefetch // self.num_workers)),
            persistent_workers=False,  # each epoch's plan goes to freshly forked workers
        )
        return iter(loader)

    def epoch(self, epoch: int) -> Iterator[PackedBatch]:
        expected = self.steps(epoch)
        done = 0
        items = self._items(epoch)
        try:
            for item in items:
                for reason, shard, key, message in item.skips:
                    self.counter.record(reason, shard, key, message)
                self._lost.update(item.lost)
                if item.error is not None:
                    raise _rebuild(item.error)
                if item.batch is not None:
                    done += 1
                    yield item.batch
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
        if self.spec.train and done != expected:
            # Should never happen; if it did, DDP would hang on the ranks that expect more steps.
            raise RuntimeError(f"split {self.spec.split} rank {self.spec.rank}: streamed {done} batches, planned {expected}")


def _rebuild(error: tuple[str, str, str | None, str | None]) -> Exception:
    kind, text, shard, key = error
    if kind == "bad":
        reason, _, message = text.partition("\x00")
        return BadSampleError(reason, message, shard=shard, key=key)
    return StorageError(text)


def open_stream(data_cfg: Any, manifest: Manifest, spec: LoaderSpec, options: StorageOptions | None = None) -> StreamLoader:
    """The streaming :class:`SplitLoader` for ``spec`` (``data.loader: stream``, see :mod:`aem_dist.data.registry`)."""
    return StreamLoader(data_cfg, manifest, spec, options)
