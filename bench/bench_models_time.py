"""Wall time per training run of each comparison method relative to ABMIL + AEM — the paper's Table 1
"Time" column as ratios (paper: DTFD-MIL 1.21×, IBMIL 1.90×, MHIM-MIL 2.08×, ACMIL 1.19× of AEM).

    PYTHONPATH=$PWD python bench/bench_models_time.py                       # scaled-down wsi-small, 3 epochs
    PYTHONPATH=$PWD python bench/bench_models_time.py --scale 1 --epochs 10 --rounds 3

Every method trains the same data with the same settings (the paper's batch of one bag, lr 1e-4,
hidden 128, evaluation of val and test every epoch), in rounds: each round runs every method once, in
order, so that load on a shared machine hits all of them alike; the table gives the median over rounds.
ABMIL runs with AEM (λ = 0.1); the others as the methods themselves (λ = 0). A run is what a user waits
for: IBMIL's includes stage 1 and the confounder k-means, C2C's the per-slide clustering (a fresh run
clusters every slide once), MHIM-MIL's the teacher's forward passes. Single-threaded torch on CPU.
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

REFERENCE = "abmil"
METHODS = ("abmil", "dtfd", "acmil", "ibmil", "mhim", "c2c", "lossattn", "ilra")
PAPER = {"abmil": 1.00, "dtfd": 1.21, "ibmil": 1.90, "mhim": 2.08, "acmil": 1.19}  # Table 1, ÷ AEM's 10.5 min


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(METHODS))
    parser.add_argument("--scale", type=float, default=0.2, help="wsi-small's bag counts × this (bag sizes unchanged)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lam", type=float, default=0.1, help="λ of the ABMIL + AEM reference")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="aem-wsi-small-")
    spec = get_spec("wsi-small", scale=args.scale)
    write_synthetic(spec, root, seed=0, progress=False)
    models = [REFERENCE] + [m for m in args.models if m != REFERENCE]
    walls: dict[str, list[float]] = {m: [] for m in models}
    aucs: dict[str, list[float]] = {m: [] for m in models}
    for round_ in range(args.rounds + 1):  # round 0 warms up (imports, allocator, first kernels) and is not counted
        for name in models if round_ else [REFERENCE]:
            lam = args.lam if name == REFERENCE else 0.0
            cfg = load_config(
                "demo",
                [
                    f"data.root={root}", f"model.name={name}", f"loss.lam={lam}", "model.hidden=128", "train.lr=1e-4",
                    f"train.epochs={args.epochs}", "train.max_bags_per_batch=1", "train.max_instances_per_batch=null", "train.progress=false",
                ],
            )
            with tempfile.TemporaryDirectory(prefix="aem-run-") as run_dir:
                t0 = time.perf_counter()
                result = run_local(cfg, run_dir=run_dir)
                wall = time.perf_counter() - t0
            if round_:
                walls[name].append(wall)
                aucs[name].append(result.test["auc"])
    ref = statistics.median(walls[REFERENCE])
    print(
        f"torch {torch.__version__}, 1 thread; wsi-small × {args.scale:g} ({sum(spec.n_bags.values())} bags, D = {spec.dim}, "
        f"{len(spec.class_names)} classes), {args.epochs} epochs, one bag a step, median of {args.rounds} rounds"
    )
    print("| method | λ | wall s per run | × ABMIL+AEM | paper × AEM | test AUC (median) |")
    print("|---|---|---|---|---|---|")
    for name in models:
        w = statistics.median(walls[name])
        paper = f"{PAPER[name]:.2f}×" if name in PAPER else "—"
        lam = args.lam if name == REFERENCE else 0.0
        print(f"| {name} | {lam:g} | {w:.1f} | {w / ref:.2f}× | {paper} | {statistics.median(aucs[name]):.3f} |", flush=True)


if __name__ == "__main__":
    main()
