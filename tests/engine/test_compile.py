"""train.compile: the compiled forward + loss gives eager's numbers (COMPILE_RTOL), graphs bounded.

One tiny model and two epochs: inductor compiles C++ kernels on CPU, which takes most of a minute
on a small machine, so this is the only test that compiles.
"""

from __future__ import annotations

import logging

import pytest

from aem_dist.config import load_config
from aem_dist.engine.compile import COMPILE_RTOL, RECOMPILE_LIMIT, GraphCounter
from aem_dist.engine.loop import fit


def test_compiled_training_matches_eager(demo_data, caplog):
    base = [f"data.root={demo_data}", "train.progress=false", "train.epochs=2", "model.hidden=8", "train.max_bags_per_batch=8"]
    eager = fit(load_config("demo", base))
    with caplog.at_level(logging.INFO, logger="aem_dist.engine.compile"):
        compiled = fit(load_config("demo", [*base, "train.compile=on"]))
    assert "torch.compile: 1 new graph(s) for a step of 8 bag(s)" in caplog.text
    assert 1 <= GraphCounter.count() <= RECOMPILE_LIMIT  # dynamic shapes: not one graph per batch length
    for row_e, row_c in zip(eager.history, compiled.history):
        for key in ("loss", "ce", "aem"):
            assert row_c["train"][key] == pytest.approx(row_e["train"][key], rel=COMPILE_RTOL), key
        for split in ("val", "test"):
            for key in ("auc", "f1"):
                assert row_c[split][key] == pytest.approx(row_e[split][key], abs=1e-3), (split, key)
