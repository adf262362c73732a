"""float32 features of 3e38 are finite but overflow the first layer: verify and the loaders refuse
them like NaN (before: verify OK, training died with a 21-frame NonFiniteLossError)."""

from __future__ import annotations

import json

import numpy as np

from aem_dist.data.verify import verify_dataset
from tests.data.helpers import bag_row, members_of, npy, tar_bytes, tiny_bag, write_raw_dataset


def test_float32_features_of_3e38_fail_verify(tmp_path):
    good = tiny_bag(0)
    feats = np.full((3, 4), 3e38, np.float32)
    meta = json.dumps({"slide_id": "bag-009", "label": 1, "n_instances": 3, "dim": 4}).encode()
    root = str(tmp_path / "ds")
    write_raw_dataset(root, [(tar_bytes(members_of(good) + [("bag-009.feats.npy", npy(feats)), ("bag-009.json", meta)]), [bag_row(good), ("bag-009", 1, 3)])])
    report = verify_dataset(root, progress=False)
    assert not report.ok and report.n_bags == 1
    assert "key 'bag-009': features hold values beyond float16 range (±65504)" in report.text() and "[non_finite]" in report.text()
