"""A population's step runs chunk of members after chunk (cache-sized): the same gradients as one backward."""

from __future__ import annotations

import pytest
import torch

from aem_dist.config import load_config
from aem_dist.data.packing import PackedBatch
from aem_dist.engine.dist import DistContext
from aem_dist.engine.population import Members, cache_bytes, chunk_size, member_chunks
from tests.core.test_population import float64  # noqa: F401  (the fixture)


class Dims:  # what Members reads from a manifest
    dim, n_classes = 12, 3


def _grads(chunk: int | None, model: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    cfgs = [load_config("demo", [f"model.name={model}", "model.hidden=16", "train.data_seed=0", f"train.seed={i}", f"loss.lam={0.2 * i}"]
        + (["loss.kind=kl_uniform"] if i == 2 else [])) for i in range(5)]
    members = Members(cfgs, Dims, DistContext())
    members.pop.chunk = chunk
    members.seed_epoch(0, 0)
    torch.manual_seed(1)
    sizes = torch.tensor([4, 1, 6])
    batch = PackedBatch(torch.randn(11, 12), torch.repeat_interleave(torch.arange(3), sizes), torch.tensor([0, 4, 5, 11]), torch.tensor([0, 2, 1]),
        ["a", "b", "c"])
    loss, terms = members.backward(batch, DistContext())
    return members.pop.flat.grad.clone(), loss, terms


@pytest.mark.parametrize("model", ["abmil", "dsmil"], ids=["vmap", "member-by-member"])
def test_chunked_step_gives_the_gradient_of_one_backward(float64, model):
    whole, loss, terms = _grads(None, model)  # tiny batch: one chunk of all 5
    for chunk in (1, 2):
        got, got_loss, got_terms = _grads(chunk, model)
        torch.testing.assert_close(got, whole, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got_loss, loss, rtol=1e-12, atol=1e-14)
        assert got_loss.shape == (5,) and set(got_terms) == set(terms) and not got_loss.requires_grad


def test_chunks_are_sized_to_the_cache(tmp_path):
    for index, (level, size, shared) in enumerate([(1, "32K", "0"), (2, "1024K", "0"), (3, "32768K", "0-1")]):
        d = tmp_path / f"index{index}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "size").write_text(f"{size}\n")
        (d / "shared_cpu_list").write_text(f"{shared}\n")
    assert cache_bytes(str(tmp_path)) == 1024 * 1024 + 16 * 1024 * 1024  # L2 + this core's half of L3
    assert cache_bytes(str(tmp_path / "none")) == 2 * 1024**2  # nothing to read: 2 MiB
    budget = cache_bytes()
    assert chunk_size(10, 128, 35, "fp32") == min(35, budget // (8 * 10 * 128 * 4))  # small bags: (nearly) everyone at once
    assert chunk_size(10**6, 128, 35, "fp32") == 1  # a huge bag: one member at a time
    assert chunk_size(1800, 128, 35, "bf16") >= chunk_size(1800, 128, 35, "fp32")  # bf16 activations are half the bytes
    assert member_chunks(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)] and member_chunks(2, 5) == [slice(0, 2)]


def test_chunked_prediction_equals_one_pass(float64):
    cfgs = [load_config("demo", ["model.hidden=16", "train.data_seed=0", f"train.seed={i}"]) for i in range(5)]
    pop = Members(cfgs, Dims, DistContext()).pop
    feats, bag_index = torch.randn(11, 12), torch.repeat_interleave(torch.arange(3), torch.tensor([4, 1, 6]))
    logits, attn = pop.predict(feats, bag_index, 3)
    pop.chunk = 2
    assert pop.chunks(11) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    parts = [pop.predict(feats, bag_index, 3, part) for part in pop.chunks(11)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), logits, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), attn, rtol=1e-12, atol=1e-14)
