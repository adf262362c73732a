import numpy as np
import pytest
import torch

from aem_dist.data.packing import pack, plan_batches, plan_rank, subsample
from aem_dist.data.schema import Bag


def test_budget_and_oversize_bags_alone():
    sizes = [5, 5, 20, 3, 3, 3, 100, 1]
    batches = plan_batches(sizes, max_instances=12, max_bags=3)
    assert [i for b in batches for i in b] == list(range(len(sizes)))
    for b in batches:
        load = sum(sizes[i] for i in b)
        assert len(b) <= 3
        assert load <= 12 or len(b) == 1  # a bag over budget trains alone, never truncated
    assert [6] in batches and [2] in batches


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_train_plan_equal_steps_and_full_coverage(world):
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 50, size=37).tolist()
    plans = [plan_rank(sizes, rank=r, world_size=world, max_instances=60, max_bags=4, train=True, seed=1, epoch=2) for r in range(world)]
    assert len({len(p) for p in plans}) == 1  # the same number of steps on every rank
    seen = [i for p in plans for b in p for i in b]
    assert set(seen) == set(range(37))
    assert len(seen) - 37 <= max(len(b) for p in plans for b in p) * (world - 1)  # only wrap-around padding repeats


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_plan_sees_each_bag_once(world):
    sizes = list(range(1, 24))
    plans = [plan_rank(sizes, rank=r, world_size=world, max_instances=30, max_bags=5, train=False) for r in range(world)]
    seen = sorted(i for p in plans for b in p for i in b)
    assert seen == list(range(23))


def test_epoch_order_depends_on_seed_and_epoch():
    sizes = [1] * 50
    a = plan_rank(sizes, rank=0, world_size=1, max_instances=None, max_bags=1, train=True, seed=0, epoch=0)
    assert a == plan_rank(sizes, rank=0, world_size=1, max_instances=None, max_bags=1, train=True, seed=0, epoch=0)
    assert a != plan_rank(sizes, rank=0, world_size=1, max_instances=None, max_bags=1, train=True, seed=0, epoch=1)
    assert a != plan_rank(sizes, rank=0, world_size=1, max_instances=None, max_bags=1, train=True, seed=1, epoch=0)


def _bags(sizes, dim=3):
    return [Bag(f"b{i}", np.full((n, dim), i, np.float16), label=i % 2, coords=np.zeros((n, 2), np.int32)) for i, n in enumerate(sizes)]


def test_pack_layout():
    batch = pack(_bags([2, 1, 3]), with_coords=True)
    assert batch.feats.shape == (6, 3) and batch.feats.dtype == torch.float32
    assert batch.bag_index.tolist() == [0, 0, 1, 2, 2, 2]
    assert batch.offsets.tolist() == [0, 2, 3, 6]
    assert batch.labels.tolist() == [0, 1, 0]
    assert batch.feats[:, 0].tolist() == [0, 0, 1, 2, 2, 2]
    assert batch.coords.shape == (6, 2)


def test_subsample_keeps_a_subset_per_bag():
    batch = pack(_bags([10, 1, 7]))
    batch.feats[:, 1] = torch.arange(batch.n_instances, dtype=torch.float32)
    out = subsample(batch, 0.3, torch.Generator().manual_seed(0))
    assert out.sizes().tolist() == [3, 1, 3]
    assert out.bag_index.tolist() == [0, 0, 0, 1, 2, 2, 2]
    rows = out.feats[:, 1].long()
    assert torch.all(batch.bag_index[rows] == out.bag_index)  # every kept row comes from its own bag
    assert subsample(batch, 1.0) is batch
