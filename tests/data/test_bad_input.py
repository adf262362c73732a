"""Every bad-input case, for both policies and both loaders.

``error`` must stop with a BadSampleError naming the shard, the key (where there is one) and the
problem; ``skip`` must deliver every good bag, count the problem once under its reason, and go on.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from aem_dist.config import DataConfig
from aem_dist.data.loader import LoaderSpec
from aem_dist.data.registry import open_split
from aem_dist.data.manifest import load_manifest
from aem_dist.data.schema import BadSampleError
from aem_dist.data.shards import write_dataset
from tests.data.helpers import CLASSES, DIM, bag_row, flip_byte, members_of, meta_json, npy, tar_bytes, tiny_bag, write_raw_dataset


class CreatesFile:
    """Unpickling this object creates ``path``: the payload a malicious shard would carry."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@dataclass
class Case:
    reason: str
    shard: str
    bad_key: str | None
    good: set[str]
    canary: Path | None = None  # a file that must never come to exist


GOOD = [tiny_bag(i) for i in range(3)]


def _with_bad(root: str, bad_members: list[tuple[str, bytes]], row: tuple[str, int, int]) -> None:
    members = members_of(GOOD[0]) + members_of(GOOD[1]) + bad_members + members_of(GOOD[2])
    write_raw_dataset(root, [(tar_bytes(members), [bag_row(GOOD[0]), bag_row(GOOD[1]), row, bag_row(GOOD[2])])])


def _sample(key: str, feats: bytes, label=0, n: int = 3, **extra) -> list[tuple[str, bytes]]:
    meta = {"slide_id": key, "n_instances": n, "dim": DIM, **extra}
    if label is not None:
        meta["label"] = label
    return [(f"{key}.feats.npy", feats), (f"{key}.json", meta_json(**meta))]


GOOD_KEYS = {b.key for b in GOOD}
F = np.ones((3, DIM), np.float16)


def case_truncated_tar(root, tmp):
    data = tar_bytes(members_of(GOOD[0]) + members_of(GOOD[1]) + members_of(GOOD[2]))
    cut = data[: data.index(b"bag-002.feats.npy") + 512 + 40]  # inside bag-002's feats
    write_raw_dataset(root, [(cut, [bag_row(b) for b in GOOD])])  # a manifest that describes the cut file
    return Case("truncated_tar", "train-000000.tar", "bag-002", {"bag-000", "bag-001"})


def case_corrupt_npy(root, tmp):
    _with_bad(root, _sample("bad", b"\x93NUMPY\x01\x00v\x00{'descr': garbage"), ("bad", 0, 3))
    return Case("corrupt_npy", "train-000000.tar", "bad", GOOD_KEYS)


def case_object_dtype(root, tmp):
    canary = tmp / "object-dtype-was-unpickled"
    arr = np.empty((3, DIM), dtype=object)
    arr[:] = CreatesFile(str(canary))
    _with_bad(root, _sample("bad", npy(arr, allow_pickle=True)), ("bad", 0, 3))
    return Case("object_dtype", "train-000000.tar", "bad", GOOD_KEYS, canary)


def case_pickle_member(root, tmp):
    canary = tmp / "pyd-was-unpickled"
    payload = pickle.dumps(CreatesFile(str(canary)))
    _with_bad(root, _sample("bad", npy(F)) + [("bad.pyd", payload), ("bad.pth", payload)], ("bad", 0, 3))
    return Case("unexpected_member", "train-000000.tar", "bad", GOOD_KEYS, canary)


def case_empty_bag(root, tmp):
    _with_bad(root, _sample("bad", npy(np.zeros((0, DIM), np.float16)), n=0), ("bad", 0, 0))
    return Case("empty_bag", "train-000000.tar", "bad", GOOD_KEYS)


def case_non_finite(root, tmp):
    f = F.copy()
    f[1, 2] = np.nan
    f[2, 0] = np.inf
    _with_bad(root, _sample("bad", npy(f)), ("bad", 0, 3))
    return Case("non_finite", "train-000000.tar", "bad", GOOD_KEYS)


def case_dim_mismatch(root, tmp):
    _with_bad(root, _sample("bad", npy(np.ones((3, DIM + 1), np.float16))), ("bad", 0, 3))
    return Case("dim_mismatch", "train-000000.tar", "bad", GOOD_KEYS)


def case_missing_label(root, tmp):
    _with_bad(root, _sample("bad", npy(F), label=None), ("bad", 0, 3))
    return Case("missing_label", "train-000000.tar", "bad", GOOD_KEYS)


def case_label_out_of_range(root, tmp):
    _with_bad(root, _sample("bad", npy(F), label=len(CLASSES) + 5), ("bad", 1, 3))
    return Case("label_out_of_range", "train-000000.tar", "bad", GOOD_KEYS)


def case_duplicate_key(root, tmp):
    _with_bad(root, _sample("bad", npy(F)) + _sample("bad", npy(F)), ("bad", 0, 3))
    return Case("duplicate_key", "train-000000.tar", "bad", GOOD_KEYS)


def case_sha256_mismatch(root, tmp):
    bags = [tiny_bag(i) for i in range(6)]
    m = write_dataset(root, [("train", b) for b in bags], DIM, CLASSES, shard_bytes=3000)
    shards = m.splits["train"].shards
    assert len(shards) >= 2
    flip_byte(Path(root) / shards[0].name, 600)  # inside the first member's data: still a valid tar
    good = {b.key for s in shards[1:] for b in s.bags}
    return Case("sha256_mismatch", shards[0].name, None, good)


CASES = [case_truncated_tar, case_corrupt_npy, case_object_dtype, case_pickle_member, case_empty_bag, case_non_finite,
         case_dim_mismatch, case_missing_label, case_label_out_of_range, case_duplicate_key, case_sha256_mismatch]  # fmt: skip


def _loader(root, tmp, loader, policy):
    m = load_manifest(root)
    cfg = DataConfig(root=root, loader=loader, on_bad_sample=policy, cache_dir=str(tmp / "cache"))
    return open_split(cfg, m, LoaderSpec("train", 0, 1, train=False, on_bad_sample=policy))


@pytest.mark.parametrize("loader", ["memory", "stream"])
@pytest.mark.parametrize("make", CASES, ids=[c.__name__[5:] for c in CASES])
def test_error_policy_names_shard_key_problem(make, loader, tmp_path):
    root = str(tmp_path / "ds")
    case = make(root, tmp_path)
    with pytest.raises(BadSampleError) as info:
        list(_loader(root, tmp_path, loader, "error").epoch(0))
    err = info.value
    assert err.reason == case.reason
    assert case.shard in str(err) and err.shard == case.shard
    if case.bad_key:
        assert err.key == case.bad_key and repr(case.bad_key) in str(err)
    if case.canary is not None:
        assert not case.canary.exists()


@pytest.mark.parametrize("loader", ["memory", "stream"])
@pytest.mark.parametrize("make", CASES, ids=[c.__name__[5:] for c in CASES])
def test_skip_policy_counts_and_continues(make, loader, tmp_path):
    root = str(tmp_path / "ds")
    case = make(root, tmp_path)
    split_loader = _loader(root, tmp_path, loader, "skip")
    got = [k for epoch in (0, 1) for b in split_loader.epoch(epoch) for k in b.keys]  # two passes: counted once
    assert set(got) == case.good and len(got) == 2 * len(case.good)  # every good bag once per epoch
    assert dict(split_loader.skipped) == {case.reason: 1}
    assert split_loader.n_bags == len(case.good)
    if case.canary is not None:
        assert not case.canary.exists()


def test_canary_payload_is_live(tmp_path):
    """Guard against a vacuous test: unpickling the payload really creates the file."""
    target = tmp_path / "proof"
    pickle.loads(pickle.dumps(CreatesFile(str(target)))).close()
    assert target.exists()


def test_training_skips_bad_bags_and_reports_them(tmp_path):
    from aem_dist.config import load_config
    from aem_dist.engine.loop import fit

    root = str(tmp_path / "ds")
    f = F.copy()
    f[0, 0] = np.nan
    bags = [tiny_bag(i) for i in range(6)]
    members = [m for b in bags[:3] for m in members_of(b)] + _sample("bad", npy(f)) + [m for b in bags[3:] for m in members_of(b)]
    write_raw_dataset(root, [(tar_bytes(members), [bag_row(b) for b in bags[:3]] + [("bad", 0, 3)] + [bag_row(b) for b in bags[3:]])])
    cfg = load_config(None, {"data.root": root, "data.loader": "stream", "data.on_bad_sample": "skip", "data.cache_dir": str(tmp_path / "c"),
                             "train.epochs": 2, "train.progress": False, "model.hidden": 8})  # fmt: skip
    result = fit(cfg)
    assert result.skipped == {"non_finite": 1}
    assert [row["train"]["steps"] for row in result.history] == [7, 7]  # planned steps kept: the empty step repeats a bag
