"""Getting bags onto the training device: a device-resident split, or pinned, overlapped copies.

``data.device_cache`` (``auto | on | off``) decides, per split and rank, in :func:`place_on_device`:

* **cached** — the decoded split (float16, as stored) is copied to the GPU once and stays there for
  the whole run; each step packs its batch on the device (slice views, one ``cat``, one cast to
  float32), so no feature byte crosses PCIe after the first epoch. ``auto`` chooses it when the split
  fits in :data:`FREE_FRACTION` of the device's free memory; ``on`` forces it.
* **pinned** — otherwise on a GPU: a host thread packs the next batches in float16 into pinned
  (page-locked) memory while the device trains, and each batch is copied with ``non_blocking=True``
  on a side CUDA stream, then cast to float32 on the device (half the bytes over PCIe of a float32
  copy). The compute stream waits for the copy stream only when it uses the batch.
* **as is** — on CPU there is nothing to copy: the setting is a no-op and the log says so.

The choice and its reason are logged once per split. Loaders keep the :class:`SplitLoader`
interface, so the engine does not know which one it got; their batches are already on the device
(``PackedBatch.to(device)`` is then a no-op).
"""

from __future__ import annotations

import logging
from typing import Iterator, get_args

import numpy as np
import torch

from ..config import DeviceCacheMode
from .loader import InMemoryLoader, SplitLoader
from .packing import PackedBatch, pack
from .prefetch import in_background

log = logging.getLogger(__name__)

MODES = get_args(DeviceCacheMode)
FREE_FRACTION = 0.5  # share of the device's free memory a cached split may take (``auto``)
PREFETCH = 2  # batches packed ahead by the host thread of the pinned path


def split_bytes(loader: InMemoryLoader) -> int:
    """Bytes of a split's features as stored (float16)."""
    return int(sum(np.asarray(b.feats).nbytes for b in loader.bags))


def place_on_device(loader: SplitLoader, mode: str, device: torch.device) -> SplitLoader:
    """The loader to train/evaluate ``loader``'s split on ``device`` under ``data.device_cache = mode``.

    Raises ValueError for an unknown mode; a forced (``on``) cache that does not fit fails with the
    device's out-of-memory error naming ``data.device_cache``.
    """
    if mode not in MODES:
        raise ValueError(f"data.device_cache {mode!r} not in {MODES}")
    split = loader.spec.split
    if device.type != "cuda":
        if mode != "off":
            log.info("data.device_cache=%s: no-op for split %r on %s (bags stay in host memory; nothing to copy)", mode, split, device.type)
        return loader
    held = loader.in_memory()
    if held is None:
        log.info("data.device_cache=%s: split %r is read from storage as it trains (%s), so it is not cached on %s; batches use pinned "
            "copies", mode, split, type(loader).__name__, device)
        return PinnedLoader(loader, device)
    need = split_bytes(held)
    free, _total = torch.cuda.mem_get_info(device)
    fits = need <= FREE_FRACTION * free
    if mode == "on" or (mode == "auto" and fits):
        log.info("data.device_cache=%s: split %r kept on %s (%.2f GiB of features; %.2f GiB free)", mode, split, device, need / 2**30, free / 2**30)
        try:
            return DeviceCachedLoader(held, device)
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(f"data.device_cache=on: split {split!r} ({need / 2**30:.2f} GiB) does not fit on {device}: {err}") from None
    why = "off" if mode == "off" else f"{need / 2**30:.2f} GiB > {FREE_FRACTION:.0%} of {free / 2**30:.2f} GiB free"
    log.info("data.device_cache=%s: split %r stays in host memory (%s); batches use pinned, non-blocking copies", mode, split, why)
    return PinnedLoader(loader, device)


class _Delegate:
    """The SplitLoader interface, forwarded to the wrapped loader."""

    def __init__(self, inner: SplitLoader):
        self.inner = inner
        self.spec = inner.spec
        self.skipped = inner.skipped

    @property
    def n_bags(self) -> int:
        return self.inner.n_bags

    @property
    def listed_bags(self) -> int:
        return self.inner.listed_bags

    @property
    def lost(self) -> set[tuple[str, str]]:
        return self.inner.lost

    def steps(self, epoch: int) -> int:
        return self.inner.steps(epoch)

    def repeat_fraction(self, epoch: int) -> float:
        return self.inner.repeat_fraction(epoch)

    def in_memory(self) -> InMemoryLoader | None:
        return self.inner.in_memory()


class DeviceCachedLoader(_Delegate):
    """An in-memory split held on ``device`` as one float16 ``(total_instances, D)`` tensor.

    Works on any device (CPU in tests); :func:`place_on_device` uses it only for CUDA.
    """

    def __init__(self, inner: InMemoryLoader, device: torch.device):
        super().__init__(inner)
        self.device = torch.device(device)
        bags = inner.bags
        self.sizes = [b.n for b in bags]
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        dim = int(np.asarray(bags[0].feats).shape[1]) if bags else 0
        dtype = torch.from_numpy(np.asarray(bags[0].feats[:0])).dtype if bags else torch.float16
        self.feats = torch.empty((int(self.starts[-1]), dim), dtype=dtype, device=self.device)
        for b, lo in zip(bags, self.starts):  # bag by bag: no second full-size host copy
            self.feats[lo : lo + b.n].copy_(torch.from_numpy(np.asarray(b.feats)))
        self.labels = torch.tensor([b.label for b in bags], dtype=torch.int64, device=self.device)

    def epoch(self, epoch: int) -> Iterator[PackedBatch]:
        inner = self.inner
        for idx in inner.plan(epoch):
            yield self.pack(idx)

    def pack(self, idx: list[int]) -> PackedBatch:
        """Batch of the bags at positions ``idx``, packed on the device (float32 features)."""
        parts = [self.feats[self.starts[i] : self.starts[i + 1]] for i in idx]  # views
        feats = (parts[0] if len(parts) == 1 else torch.cat(parts)).float()
        sizes = [self.sizes[i] for i in idx]
        offsets = torch.tensor([0, *np.cumsum(sizes).tolist()], dtype=torch.int64)
        n_inst = int(offsets[-1])
        dev_sizes = torch.tensor(sizes, dtype=torch.int64).to(self.device, non_blocking=True)
        bags = [self.inner.bags[i] for i in idx]
        coords = None
        if self.spec.with_coords and all(b.coords is not None for b in bags):
            coords = torch.from_numpy(np.concatenate([b.coords for b in bags], axis=0))
        return PackedBatch(
            feats=feats,
            # output_size: the length is known on the host, so repeat_interleave needs no device sync
            bag_index=torch.repeat_interleave(torch.arange(len(idx), device=self.device), dev_sizes, output_size=n_inst),
            offsets=offsets.to(self.device, non_blocking=True),
            labels=self.labels[torch.tensor(idx, dtype=torch.int64).to(self.device, non_blocking=True)],
            keys=[b.key for b in bags],
            coords=coords,
        )


class PinnedLoader(_Delegate):
    """Batches packed on the host in float16, pinned (CUDA only), copied ahead on a side stream.

    With ``device`` a CPU (tests) it only moves batches through the same prefetch thread.
    """

    def __init__(self, inner: SplitLoader, device: torch.device):
        super().__init__(inner)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None

    def _packed(self, epoch: int) -> Iterator[PackedBatch]:
        """Host batches; on CUDA in pinned memory, packed in float16 when the bags are in RAM."""
        held = self.inner.in_memory()
        if not self.cuda:
            yield from self.inner.epoch(epoch)
        elif held is not None:
            for idx in held.plan(epoch):
                yield pack_pinned([held.bags[i] for i in idx], held.spec.with_coords)
        else:
            for b in self.inner.epoch(epoch):
                yield PackedBatch(b.feats.pin_memory(), b.bag_index.pin_memory(), b.offsets.pin_memory(), b.labels.pin_memory(), b.keys, b.coords)

    def epoch(self, epoch: int) -> Iterator[PackedBatch]:
        ahead: PackedBatch | None = None
        for host in in_background(self._packed(epoch), PREFETCH, f"pin-{self.spec.split}"):  # packing overlaps the device's work
            nxt = self._to_device(host)  # issued now; runs while the caller trains on ``ahead``
            if ahead is not None:
                yield self._ready(ahead)
            ahead = nxt
        if ahead is not None:
            yield self._ready(ahead)

    def _to_device(self, b: PackedBatch) -> PackedBatch:
        if not self.cuda:
            return b.to(self.device, torch.float32)
        with torch.cuda.stream(self.stream):
            out = b.to(self.device)  # non_blocking from pinned memory: asynchronous
            return PackedBatch(out.feats.float(), out.bag_index, out.offsets, out.labels, out.keys, out.coords)

    def _ready(self, b: PackedBatch) -> PackedBatch:
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for t in (b.feats, b.bag_index, b.offsets, b.labels):
                t.record_stream(current)  # the caching allocator must not reuse them while current uses them
        return b


def pack_pinned(bags, with_coords: bool = False) -> PackedBatch:
    """:func:`~aem_dist.data.packing.pack` into page-locked memory, keeping the stored float16."""
    plain = pack(bags, dtype=torch.float16, with_coords=with_coords)
    feats = torch.empty(plain.feats.shape, dtype=plain.feats.dtype, pin_memory=True)
    feats.copy_(plain.feats)
    return PackedBatch(feats, plain.bag_index.pin_memory(), plain.offsets.pin_memory(), plain.labels.pin_memory(), plain.keys, plain.coords)
