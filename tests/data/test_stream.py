"""The streaming loader on local datasets: same bags as the in-memory loader, rank/worker splits, order."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from aem_dist.config import DataConfig
from aem_dist.data.loader import LoaderSpec, open_memory
from aem_dist.data.registry import open_split
from aem_dist.data.manifest import load_manifest
from aem_dist.data.stream import StreamLoader
from tests.data.helpers import write_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny"))
    write_tiny(root, n_train=13, n_val=5)
    return root


def stream_cfg(root, tmp_path, **kw):
    return DataConfig(root=root, loader="stream", cache_dir=str(tmp_path / "cache"), **kw)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_equals_memory_bit_for_bit(tiny, tmp_path, num_workers):
    m = load_manifest(tiny)
    assert len(m.splits["val"].shards) > 1
    spec = LoaderSpec("val", 0, 1, False, max_bags=2, with_coords=True)
    mem = list(open_memory(tiny, m, spec).epoch(0))
    loader = open_split(stream_cfg(tiny, tmp_path, num_workers=num_workers), m, spec)
    assert isinstance(loader, StreamLoader)
    got = list(loader.epoch(0))
    if num_workers > 1:  # workers take contiguous runs of batches, handed out round-robin: same batches, another order
        got, mem = sorted(got, key=lambda b: b.keys), sorted(mem, key=lambda b: b.keys)
    assert [b.keys for b in got] == [b.keys for b in mem]
    for a, b in zip(got, mem):
        assert torch.equal(a.feats, b.feats) and torch.equal(a.offsets, b.offsets) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.coords, b.coords)
    assert loader.n_bags == 5 and not loader.skipped


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_equal_steps_and_full_coverage(tiny, tmp_path, num_workers):
    m = load_manifest(tiny)
    cfg = stream_cfg(tiny, tmp_path, num_workers=num_workers)
    seen: Counter = Counter()
    steps = []
    for rank in range(2):
        loader = open_split(cfg, m, LoaderSpec("train", rank, 2, True, seed=7))
        batches = list(loader.epoch(0))
        assert len(batches) == loader.steps(0)
        steps.append(len(batches))
        seen.update(k for b in batches for k in b.keys)
    assert steps[0] == steps[1] == 7  # 13 bags, batch of 1: ceil(13 / 2)
    assert set(seen) == {b.key for b in m.splits["train"].bags()}
    assert sum(seen.values()) == 14  # one wrap-around repeat


def test_order_depends_on_seed_and_epoch_not_on_run(tiny, tmp_path):
    m = load_manifest(tiny)
    cfg = stream_cfg(tiny, tmp_path, num_workers=0)

    def order(seed, epoch):
        return [k for b in open_split(cfg, m, LoaderSpec("train", 0, 1, True, seed=seed)).epoch(epoch) for k in b.keys]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert sorted(order(1, 0)) == sorted(order(1, 1))


def test_early_stop_leaves_no_thread(tiny, tmp_path):
    import threading

    m = load_manifest(tiny)
    loader = open_split(stream_cfg(tiny, tmp_path, num_workers=0, prefetch=1), m, LoaderSpec("train", 0, 1, True))
    it = loader.epoch(0)
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "stream-prefetch"]


def test_fit_runs_on_the_stream_loader(tiny, tmp_path):
    from aem_dist.config import load_config
    from aem_dist.engine.loop import fit

    cfg = load_config(None, {"data.root": tiny, "data.loader": "stream", "data.cache_dir": str(tmp_path / "c"), "train.epochs": 2, "train.progress": False, "model.hidden": 8})
    result = fit(cfg)
    assert result.best_epoch is not None and result.history[-1]["train"]["steps"] == 13
    assert result.skipped == {}
