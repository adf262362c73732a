"""Within-segment ranking and argmax (top-k selection for ACMIL, CLAM, DTFD and DSMIL)."""

from __future__ import annotations

import torch

from aem_dist.models.segment import segment_argmax, segment_rank


def test_rank_within_segments_descending_and_ascending():
    values = torch.tensor([0.5, 3.0, -1.0, 2.0, 2.0, 7.0])
    index = torch.tensor([0, 0, 1, 0, 1, 1])
    assert segment_rank(values, index, 2).tolist() == [2, 0, 2, 1, 1, 0]
    assert segment_rank(values, index, 2, descending=False).tolist() == [0, 2, 0, 1, 1, 2]


def test_ties_keep_row_order_so_packing_does_not_change_ranks():
    values = torch.tensor([1.0, 1.0, 1.0, 5.0, 5.0])
    index = torch.tensor([0, 0, 0, 1, 1])
    assert segment_rank(values, index, 2).tolist() == [0, 1, 2, 0, 1]
    assert segment_rank(values[3:], torch.zeros(2, dtype=torch.long), 1).tolist() == [0, 1]


def test_rank_per_column_and_argmax():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(50, 3, generator=g)
    index = torch.randint(0, 4, (50,), generator=g)
    ranks = segment_rank(values, index, 4)
    arg = segment_argmax(values, index, 4)
    for s in range(4):
        rows = (index == s).nonzero().squeeze(1)
        for c in range(3):
            order = rows[torch.argsort(values[rows, c], descending=True)]
            assert ranks[order, c].tolist() == list(range(len(rows)))
            assert int(arg[s, c]) == int(order[0])
    assert segment_argmax(values[:, 0], index, 4).tolist() == arg[:, 0].tolist()
