"""Gathering evaluation predictions across ranks: every listed bag once, skipped bags accounted for."""

import numpy as np
import pytest

from aem_dist.engine.dist import DistContext
from aem_dist.engine.evaluate import BagPrediction, gather_predictions, split_metrics


class TwoRanks(DistContext):
    """Rank 0 of a 2-rank world whose peer's gather contribution is given."""

    def __init__(self, peer):
        super().__init__(rank=0, world_size=2)
        self.peer = peer

    def gather_objects(self, obj):
        return [obj, self.peer]


class Loader:
    def __init__(self, listed, lost=()):
        self.listed_bags = listed
        self.lost = set(lost)


def pred(key, label=0, p1=0.5):
    return BagPrediction(key, label, np.array([1 - p1, p1]))


def test_every_bag_once_with_a_skip_on_the_other_rank():
    peer = ([pred("c", 1, 0.9)], [("train-000000.tar", "d")])  # the peer skipped bag d
    rows = gather_predictions([pred("a", 0, 0.2), pred("b", 1, 0.7)], TwoRanks(peer), Loader(4))
    assert [r.key for r in rows] == ["a", "b", "c"]
    assert split_metrics(rows, 2)["auc"] == 1.0  # metrics over all gathered bags, not per rank


def test_missing_and_duplicated_bags_are_errors():
    with pytest.raises(RuntimeError, match="gathered 2 bags, expected 3"):
        gather_predictions([pred("a")], TwoRanks(([pred("b")], [])), Loader(3))
    with pytest.raises(RuntimeError, match="more than once"):
        gather_predictions([pred("a")], TwoRanks(([pred("a")], [])), Loader(2))
