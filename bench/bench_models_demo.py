"""Every model on the synthetic `demo` preset: test AUC/F1 at the best validation epoch and training
throughput, for a few seeds, with λ = 0 and with the demo's λ. Single-threaded torch, CPU.

    PYTHONPATH=$PWD python bench/bench_models_demo.py            # all models, seeds 0 1 2
    PYTHONPATH=$PWD python bench/bench_models_demo.py --models abmil dtfd --seeds 0

Numbers on this small synthetic set say the models learn; they are not the paper's numbers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from aem_dist.config import load_config
from aem_dist.data.synthetic import get_spec, write_synthetic
from aem_dist.engine.local import run_local

ALL = ("abmil", "mha", "dsmil", "acmil", "dtfd", "maxpool", "meanpool", "clam_sb", "transmil", "lossattn", "ilra", "c2c", "mhim", "ibmil")
# The same per-model settings as tests/models/test_demo_training.py.
OVERRIDES = {"transmil": ["train.epochs=4", "train.lr=1e-3", "train.max_bags_per_batch=1", "train.eval_every=100"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(ALL))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lams", nargs="+", type=float, default=[0.0, 0.1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="aem-demo-")
    write_synthetic(get_spec("demo"), root, seed=0, progress=False)
    print(f"torch {torch.__version__}, 1 thread, demo preset (seed 0), test metrics at the best validation epoch, mean ± sd over seeds {args.seeds}")
    print("| model | λ | test AUC | test F1 | train instances/s | wall s per run |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        for lam in args.lams:
            aucs, f1s, speeds, walls = [], [], [], []
            for seed in args.seeds:
                cfg = load_config("demo", [f"data.root={root}", f"model.name={name}", f"loss.lam={lam}", f"train.seed={seed}", "train.progress=false", *OVERRIDES.get(name, [])])
                with tempfile.TemporaryDirectory(prefix="aem-run-") as run_dir:  # IBMIL keeps its stage 1 there
                    t0 = time.perf_counter()
                    result = run_local(cfg, run_dir=run_dir)
                    walls.append(time.perf_counter() - t0)
                aucs.append(result.test["auc"])
                f1s.append(result.test["f1"])
                speeds.append(statistics.mean(r["time"]["instances_per_s"] for r in result.history))
            sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
            print(
                f"| {name} | {lam:g} | {statistics.mean(aucs):.3f} ± {sd(aucs):.3f} | {statistics.mean(f1s):.3f} ± {sd(f1s):.3f} "
                f"| {statistics.mean(speeds):,.0f} | {statistics.mean(walls):.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
