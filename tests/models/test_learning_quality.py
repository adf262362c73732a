"""ABMIL (λ = 0, no Ray) learns the `c16-mini` preset — wsi-c16's heterogeneous tumour with mimics, in
seconds — to a stated test AUC, so a change that makes training learn worse (packing, selection,
attention, the optimizer) fails CI. Not a benchmark: one core, configs/demo.yaml's optimisation.

Calibration (docs/reproduction.md, "Calibration"): seeds 0–4 of this exact run reached test AUC
0.995, 0.805, 0.975, 0.962, 0.996 (2026-12-04, this 2-core VM). The bounds below sit under the worst of
them; chance is 0.5. The test runs seeds 0 and 1 (the first two, not picked)."""

from __future__ import annotations

import pytest

from aem_dist.config import load_config
from aem_dist.engine.loop import fit

MIN_AUC_EACH = 0.75  # every seed (calibration minimum 0.805)
MIN_AUC_MEAN = 0.85  # mean of the two seeds (calibration: 0.900 for seeds 0 and 1, 0.947 over 0–4)


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory):
    from aem_dist.data.synthetic import get_spec, write_synthetic

    root = str(tmp_path_factory.mktemp("c16mini") / "data")
    manifest = write_synthetic(get_spec("c16-mini"), root, seed=0, progress=False)
    assert manifest.source["probe"]["auc"] > 0.9  # the instances are separable; what is hard is the bag
    return root


def test_abmil_learns_c16_mini(mini_data):
    aucs = []
    for seed in (0, 1):
        cfg = load_config("demo", [f"data.root={mini_data}", "scaling.num_workers=0", "loss.lam=0", "train.progress=false", f"train.seed={seed}",
                                   "metrics.enabled=false"])
        result = fit(cfg)
        losses = [r["train"]["loss"] for r in result.history]
        assert losses[-1] < losses[0], (seed, losses)  # the training loss went down
        assert result.test["auc"] >= MIN_AUC_EACH, (seed, result.test)
        aucs.append(result.test["auc"])
    assert sum(aucs) / len(aucs) >= MIN_AUC_MEAN, aucs
